"""Patches for the xlnet family of transformers models (filled in by engineer G)."""
