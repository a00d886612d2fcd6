"""Correctness oracle: Hugging Face eager attention with a 4-D mask of exactly the kept positions.

Given a prompt, the tokens vLLM generated and the kept-position dump of the run
(VLLM_EVICT_DUMP_DIR), rebuild for every layer, KV head and query which logical positions the
plugin's cache held, run the HF model once over prompt + generated tokens with those masks, and
return the logprob HF gives each generated token. With fp32 they must match vLLM's to ~1e-6.

The masks differ per layer and head, so the one HF attention function is wrapped to pick its
layer's mask; the arithmetic is HF's own eager attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch


def allowed_positions(num_tokens: int, records: Sequence[dict], layers: int,
                      kv_heads: int) -> torch.Tensor:
    """[layers, kv_heads, T, T] bool: may query position q read key position k?

    A compaction recorded at logical length c_b holds `kept` and happens before tokens
    c_b, c_b + 1, ... are processed; those queries see kept plus the new tokens up to
    themselves. Queries before the first compaction see the whole causal prefix.
    """
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    allowed = causal.expand(layers, kv_heads, -1, -1).clone()
    ordered = sorted(records, key=lambda r: r["logical_len"])
    for i, rec in enumerate(ordered):
        start = rec["logical_len"]
        end = ordered[i + 1]["logical_len"] if i + 1 < len(ordered) else num_tokens
        if start >= num_tokens:
            break
        end = min(end, num_tokens)
        rows = torch.zeros(layers, kv_heads, num_tokens, dtype=torch.bool)
        for layer, kept in enumerate(rec["kept"]):  # per-layer counts may differ (pyramidkv)
            rows[layer].scatter_(-1, torch.tensor(kept, dtype=torch.int64), True)
        block = rows[:, :, None, :].expand(-1, -1, end - start, -1).clone()
        block[..., start:] = causal[start:end, start:]
        allowed[:, :, start:end, :] = block
    return allowed


@contextlib.contextmanager
def _per_layer_masks(masks: torch.Tensor, capture: dict | None = None):
    """Make HF's eager attention use masks[layer_idx] ([heads or 1, T, T] additive). With
    `capture`, record each layer's keys [kv_heads, T, D] and probabilities [q_heads, T, T]."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.eager_attention_forward

    def eager_with_layer_mask(module, query, key, value, attention_mask, *args, **kwargs):
        mask = masks[module.layer_idx][None].to(query.dtype)
        out, probs = original(module, query, key, value, mask, *args, **kwargs)
        if capture is not None:
            capture[module.layer_idx] = {"keys": key[0].detach(), "probs": probs[0].detach()}
        return out, probs

    modeling_llama.eager_attention_forward = eager_with_layer_mask
    try:
        yield
    finally:
        modeling_llama.eager_attention_forward = original


def load_reference_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def reference_logprobs(model, prompt: Sequence[int], generated: Sequence[int],
                       records: Sequence[dict], capture: dict | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob of each generated token, HF argmax at each step) under the kept masks.
    `capture` (optional) receives per-layer keys and attention probabilities."""
    cfg = model.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    group = cfg.num_attention_heads // kv_heads
    tokens = list(prompt) + list(generated[:-1])  # the last generated token is never fed
    n = len(tokens)
    allowed = allowed_positions(n, records, layers, kv_heads)
    allowed = allowed.repeat_interleave(group, dim=1)  # KV head -> its query heads
    masks = torch.zeros(allowed.shape, dtype=torch.float32)
    masks.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    ids = torch.tensor([tokens])
    with _per_layer_masks(masks, capture):
        logits = model(input_ids=ids, position_ids=torch.arange(n)[None],
                       attention_mask=masks[0][None, :1]).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(prompt) - 1, n)
    chosen = logprobs[rows, torch.tensor(list(generated))]
    return chosen, logprobs[rows].argmax(-1)


def compare(model, prompt: Sequence[int], generated: Sequence[int], vllm_logprobs: Sequence[float],
            records: Sequence[dict]) -> dict:
    """Max |Δlogprob| and greedy agreement between vLLM and the HF oracle."""
    ref, argmax = reference_logprobs(model, prompt, generated, records)
    delta = (ref - torch.tensor(list(vllm_logprobs), dtype=torch.float32)).abs()
    matches = int((argmax == torch.tensor(list(generated))).sum())
    return {"max_abs_dlogprob": float(delta.max()), "argmax_matches": matches,
            "steps": len(generated)}
