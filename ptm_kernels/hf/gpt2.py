"""Patches for GPT-2 and GPT-Neo (being written)."""
