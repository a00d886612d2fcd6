"""Attention-side pieces: views of each backend's paged KV layout (and, later, statistics)."""
