"""Patches for the bert family of transformers models (filled in by engineer G)."""
