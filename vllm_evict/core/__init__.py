"""The vLLM-free core: configuration, policies, per-request state, the observation plan and
its torch statistics, the kept-positions dump and the HF oracle.

Nothing here imports vLLM (tests/test_layering.py and ruff's banned-api rule enforce it), so it
survives vLLM upgrades unchanged and can be used and tested without an engine.
"""
