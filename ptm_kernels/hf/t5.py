"""Patches for the t5 family of transformers models (filled in by engineer G)."""
