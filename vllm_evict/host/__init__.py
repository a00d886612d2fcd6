"""The one vLLM adapter: every import, subclass and patch of a vLLM symbol lives here.

Patches go through `patching.patch`, which records them (`python -m vllm_evict --doctor`
lists them) and refuses vLLM versions the plugin was not written for. No policy logic: the
adapter asks the core what to measure and what to keep.
"""
