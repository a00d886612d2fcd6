"""Scheduler side: per-request eviction configs, page accounting, request validation."""
