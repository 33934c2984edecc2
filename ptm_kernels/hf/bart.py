"""Patches for the bart family of transformers models (filled in by engineer G)."""
