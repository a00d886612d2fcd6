"""Drive AsyncLLM with streaming-input (resumable) requests and write what happened as JSON.

    python -m tests.helpers.streaming_input_job MODEL OUT.json
"""

from __future__ import annotations

import asyncio
import json
import sys


async def main(model: str, out_path: str) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import StreamingInput
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model, enforce_eager=True, dtype="float32", max_model_len=1024, block_size=32,
        additional_config={"kv_eviction": {"policy": "streaming", "budget": 64, "window": 16}}))

    async def session(request_id: str, extra_args: dict | None) -> dict:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                extra_args=extra_args)

        async def chunks():
            for i in range(2):
                yield StreamingInput(TokensPrompt(prompt_token_ids=list(range(20 + i, 120))))

        try:
            tokens = []
            async for out in engine.generate(chunks(), params, request_id):
                tokens = list(out.outputs[0].token_ids)
            return {"ok": True, "tokens": len(tokens)}
        except Exception as exc:  # what the caller of generate() sees
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    try:
        results = {"default": await session("a", None),
                   "opt_out": await session("b", {"kv_eviction": "none"})}
        plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(TokensPrompt(prompt_token_ids=list(range(10, 300))),
                                         plain, "c"):
            results["plain_after"] = len(out.outputs[0].token_ids)
    finally:
        engine.shutdown()
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
