"""Ray Serve LLM with vllm-evict: an OpenAI app whose vLLM engines evict.

    serve run --app-dir deploy/ray serve_app:build_app                 # SmolLM2-135M on CPU
    serve run --app-dir deploy/ray serve_app:build_app replicas=2 budget=512

Ray Serve builds vLLM from engine_kwargs (AsyncEngineArgs), never from `vllm serve` flags, so the
eviction config goes in as additional_config; the plugin validates it when the engine config is
built, in the replica, before the engine starts. The plugin must be installed wherever replicas
run (the image, or runtime_env pip): vLLM loads it from its entry point in every process.
"""

from __future__ import annotations

from typing import Any

from ray.serve.llm import LLMConfig, build_openai_app

MODEL_ID = "smollm2-135m"
MODEL_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The server default, and what requests may ask for through vllm_xargs.
EVICTION: dict[str, Any] = {
    "policy": "streaming", "budget": 1024, "sink_tokens": 4, "window": 32, "slack": 64,
    "allowed_policies": ["streaming", "h2o", "snapkv"], "budget_min": 128, "budget_max": 4096,
}


def llm_config(model_source: str = MODEL_SOURCE, model_id: str = MODEL_ID, *,
               eviction: dict[str, Any] | None = None, replicas: int = 1, cpu: bool = True,
               engine_kwargs: dict[str, Any] | None = None,
               env_vars: dict[str, str] | None = None) -> LLMConfig:
    """One model's LLMConfig. cpu=True: Ray Serve LLM's CPU path (ray >= 2.54, PR 58334),
    which runs vLLM with its mp executor inside the replica (vLLM refuses its Ray executor on
    CPU); cpu=False: one GPU per replica through vLLM's Ray executor."""
    kwargs = {"additional_config": {"kv_eviction": {**EVICTION, **(eviction or {})}},
              **(engine_kwargs or {})}
    options: dict[str, Any] = {"num_replicas": replicas}
    extra: dict[str, Any] = {}
    if cpu:
        # One logical CPU per replica, held by the engine's bundle; the replica actor itself
        # takes none, so N replicas need N CPUs.
        options["ray_actor_options"] = {"num_cpus": 0}
        extra = {"accelerator_config": {"kind": "cpu"},
                 "placement_group_config": {"bundles": [{"CPU": 1}]}}
        env_vars = {"VLLM_CPU_KVCACHE_SPACE": "2", **(env_vars or {})}
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_source},
        engine_kwargs=kwargs,
        deployment_config=options,
        runtime_env={"env_vars": env_vars} if env_vars else None,
        **extra,
    )


def build_app(args: dict[str, str]):
    """`serve run` application builder; args come from the command line as strings."""
    eviction = {"budget": int(args["budget"])} if "budget" in args else {}
    if "policy" in args:
        eviction["policy"] = args["policy"]
    config = llm_config(args.get("model", MODEL_SOURCE), eviction=eviction,
                        replicas=int(args.get("replicas", 1)),
                        cpu=args.get("device", "cpu") == "cpu",
                        engine_kwargs={"max_model_len": 8192})
    return build_openai_app({"llm_configs": [config]})
