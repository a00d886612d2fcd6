"""The kvpress side of the parity benchmark. Runs under .cache/kvpress-venv/bin/python (torch,
transformers<5.3, kvpress only):

    python -m benchmarks.kvpress_parity.kvpress_worker SPEC.json OUT.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from benchmarks.kvpress_parity import EAGER, PRESSES, PROTECT, SNAP_KERNEL, SNAP_WINDOW


def kvpress_worker(spec_path: str, out_path: str) -> None:
    """Runs under .cache/kvpress-venv/bin/python: torch, transformers<5.3, kvpress only."""
    from importlib.metadata import version

    import kvpress
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(0)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - started
    layers = model.model.layers
    eager: list = []  # an eager-attention copy, loaded for the presses that read attention

    def model_for(policy: str):
        if policy not in EAGER:
            return model
        if not eager:
            eager.append(AutoModelForCausalLM.from_pretrained(
                spec["model"], dtype=torch.float32, attn_implementation="eager").eval())
        return eager[0]

    def prefill(ids: list[int], on=None) -> None:
        with torch.no_grad():
            (on or model).model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(),
                                use_cache=True)

    # --- probe: keys, and the attention of the last `window` queries / the last query
    def probe(ids: list[int], window: int) -> dict:
        captured: dict[int, dict] = {}

        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"]
            keys = kwargs["past_key_values"].layers[module.layer_idx].keys  # [1, kv, L, D], roped
            bsz, seq, _ = hidden.shape
            heads, dim = module.config.num_attention_heads, module.head_dim
            q = module.q_proj(hidden[:, -window:]).view(bsz, window, heads, dim).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            cos, sin = cos[:, -window:].unsqueeze(1), sin[:, -window:].unsqueeze(1)
            q = q * cos + rotate_half(q) * sin
            k = repeat_kv(keys, heads // keys.shape[1])
            logits = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(dim)
            future = torch.ones(window, seq, dtype=torch.bool).triu(seq - window + 1)
            probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1,
                                  dtype=torch.float32)  # [1, heads, window, L]
            captured[module.layer_idx] = {"keys": keys[0].clone(), "window": probs[0].sum(1),
                                          "last": probs[0, :, -1].clone()}
            return output

        hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
        try:
            prefill(ids)
        finally:
            for h in hooks:
                h.remove()
        return {name: torch.stack([captured[i][name] for i in range(len(layers))])
                for name in ("keys", "window", "last")}

    # --- a press run, recording the kept indices per layer
    def run_press(press, ids: list[int], on) -> list[dict]:
        kept: dict[int, dict] = {}
        original_compress = press.compress  # bound: it calls self.score, which we wrap below

        def compress(module, hidden_states, keys, values, attentions, kwargs):
            seen = {}
            original_score = press.score

            def score(*args, **kw):
                seen["scores"] = original_score(*args, **kw)
                return seen["scores"]

            press.score = score
            try:
                new_keys, new_values = original_compress(module, hidden_states, keys, values,
                                                         attentions, kwargs)
            finally:
                del press.score
            n_kept = new_keys.shape[2]
            idx = seen["scores"].topk(n_kept, dim=-1).indices  # what compress did
            exact = torch.equal(keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[3])),
                                new_keys)
            kept[module.layer_idx] = {"n_kept": n_kept, "verified": exact,
                                      "kept": idx[0].sort(dim=-1).values.tolist()}
            return new_keys, new_values

        press.compress = compress
        try:
            with press(on):
                prefill(ids, on)
        finally:
            del press.compress
        return [kept[i] for i in range(len(on.model.layers))]

    def make_press(policy: str, ratio: float):
        cls = getattr(kvpress, PRESSES[policy])
        if policy in ("snapkv", "pyramidkv"):
            return cls(compression_ratio=ratio, window_size=SNAP_WINDOW, kernel_size=SNAP_KERNEL)
        if policy == "streaming":
            return cls(compression_ratio=ratio, n_sink=PROTECT["streaming"][0])
        return cls(compression_ratio=ratio)

    out = {"versions": {"kvpress": version("kvpress"), "transformers": transformers.__version__,
                        "torch": torch.__version__},
           "load_s": load_s, "probes": {}, "cases": []}
    for name, ids in spec["prompts"].items():
        started = time.perf_counter()
        tensors = probe(ids, SNAP_WINDOW)
        torch.save(tensors, Path(out_path).with_name(f"probe-{name}.pt"))
        out["probes"][name] = {"seconds": time.perf_counter() - started}
    for case in spec["cases"]:
        press = make_press(case["policy"], case["ratio"])
        started = time.perf_counter()
        layers_kept = run_press(press, spec["prompts"][case["prompt"]], model_for(case["policy"]))
        out["cases"].append({**case, "press": repr(press), "layers": layers_kept,
                             "seconds": time.perf_counter() - started})
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    kvpress_worker(sys.argv[1], sys.argv[2])
