"""Attention backend wrappers: statistics after vLLM attention, and cache layout views."""
