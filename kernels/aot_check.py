"""Compile every Triton kernel of this folder to a CUDA cubin without a GPU (Triton ships ptxas).

The interpreter tests check the arithmetic, but not what only the compiler sees (tl.dot's shape
and type rules, control flow, register pressure). This compiles each kernel at the production
shapes (Llama-3.1-8B: GQA 4, head size 128, pages of 16) for a given SM architecture and
reports registers, spills and shared memory. Run it in a process without TRITON_INTERPRET:

    python -m vllm_evict.kernels.aot_check [--arch 80 90] [--dtype bf16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_evict.kernels import (
    triton_compaction,
    triton_decode_scores,
    triton_keydiff,
    triton_lse,
    triton_window_scores,
)

FLOAT_ARGS = {"scale_log2", "eps"}


def _signature(kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def cases(dtype: str = "bf16") -> list[tuple[str, Any, dict[str, str], dict[str, Any], int]]:
    """(name, kernel, pointer types, constexprs, num_warps) at the production shapes."""
    cache = f"*{dtype}"
    ints = {"bt_ptr": "*i32", "seq_lens_ptr": "*i32", "q_start_ptr": "*i32",
            "fresh_ptr": "*i32", "kept_ptr": "*i32", "keep_ptr": "*i64"}
    qk = {**ints, "q_ptr": cache, "k_ptr": cache, "v_ptr": cache}
    dot = {"HEAD_DIM": 128, "PAGE": 16, "GROUP": 4, "BLOCK_N": 64, "BLOCK_D": 128,
           "DOT_FP32": False}
    return [
        ("lse_partial", triton_lse._lse_partial_kernel, qk,
         {**dot, "ROWS": 16, "ROW_BLOCKS": 1}, 4),
        ("lse_partial_window", triton_lse._lse_partial_kernel, qk,
         {**dot, "ROWS": 64, "ROW_BLOCKS": 4}, 4),
        ("lse_merge", triton_lse._lse_merge_kernel, ints,
         {"GROUP": 4, "ROWS": 16, "ROW_BLOCKS": 1}, 1),
        ("decode_scores", triton_decode_scores._decode_scores_kernel, qk,
         {**dot, "ROWS": 16, "ACCUMULATE": True}, 4),
        ("window_sum", triton_window_scores._window_sum_kernel, qk,
         {**dot, "ROWS": 64, "ACCUMULATE": True, "POOL": 5}, 4),
        ("max_pool", triton_window_scores._max_pool_kernel, ints,
         {"PAGE": 16, "BLOCK_N": 64, "POOL": 5}, 4),
        ("key_sum", triton_keydiff._key_sum_kernel, qk,
         {"HEAD_DIM": 128, "PAGE": 16, "BLOCK_N": 64, "BLOCK_D": 128}, 4),
        ("keydiff", triton_keydiff._keydiff_kernel, qk,
         {"HEAD_DIM": 128, "PAGE": 16, "BLOCK_N": 64, "BLOCK_D": 128}, 4),
        ("compact", triton_compaction._compact_kernel, qk,
         {"HEAD_DIM": 128, "PAGE": 16, "PAGE_PAD": 16, "BLOCK_T": 128, "BLOCK_D": 32,
          "D_SPLITS": 4}, 4),
    ]


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and local memory (spills) from the cuobjdump shipped with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True,
                             text=True).stdout
    return {key.lower(): int(m.group(1)) for key in ("REG", "LOCAL")
            if (m := re.search(rf"\b{key}:(\d+)", out))}


# At launch Triton specialises integer arguments equal to 1 as constants; the unit strides of
# the head dimension (FlashAttention layout, contiguous queries) are what let it vectorise.
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd")


def compile_all(arch: int = 90, dtype: str = "bf16") -> dict[str, dict[str, int]]:
    if triton.knobs.runtime.interpret:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's notice
    target = GPUTarget("cuda", arch, 32)
    report = {}
    for name, kernel, pointers, constexprs, warps in cases(dtype):
        constexprs = {**constexprs, **{a: 1 for a in UNIT_STRIDES if a in kernel.arg_names}}
        sig = _signature(kernel, pointers, constexprs)
        # ... and pointers and integers divisible by 16 as such (true of vLLM's caches).
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
                 if sig[arg] != "constexpr" and (arg.endswith("_ptr") or arg.startswith("stride"))}
        src = ASTSource(kernel, sig, constexprs, attrs)
        compiled = triton.compile(src, target=target, options={"num_warps": warps})
        ptx = compiled.asm["ptx"]
        report[name] = {"num_warps": compiled.metadata.num_warps,
                        "shared_bytes": compiled.metadata.shared,
                        "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]\.", ptx)),
                        **_resource_usage(compiled.asm["cubin"])}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90],
                        help="SM versions, e.g. 80 90")
    parser.add_argument("--dtype", default="bf16", choices=["fp16", "bf16"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {f"sm{arch}": compile_all(arch, args.dtype) for arch in args.arch}
    if args.json:
        print(json.dumps(report))
        return
    for arch, kernels in report.items():
        for name, info in kernels.items():
            print(f"{arch} {name:20s} " + " ".join(f"{k}={v}" for k, v in info.items()))


if __name__ == "__main__":
    main()
