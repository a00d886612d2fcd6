"""Correctness oracle: Hugging Face eager attention with a 4-D mask of exactly the kept positions.

Given a prompt, the tokens vLLM generated and the kept-position dump of the run
(VLLM_EVICT_DUMP_DIR), rebuild for every layer, KV head and query which logical positions the
plugin's cache held, run the HF model once over prompt + generated tokens with those masks, and
return the logprob HF gives each generated token. With fp32 they must match vLLM's to ~1e-6.

The masks differ per layer and head, so the model runs with an attention implementation
registered through transformers' AttentionInterface that picks each layer's mask; the
arithmetic is eager attention's, for any HF model (no model-specific patch).
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


ATTENTION = "vllm_evict_masked_eager"
"""The transformers attention implementation the oracle registers and loads models with."""

# The per-layer masks (and capture dict) of the forward in progress; None outside one.
_active: dict | None = None


def masked_eager_attention(module, query, key, value, attention_mask, scaling=None,
                           dropout=0.0, **kwargs):
    """Eager attention (fp32 softmax, as HF's) with the mask of `module.layer_idx` from the
    forward in progress. query [B, q_heads, T, D], key/value [B, kv_heads, T, D]. Any model
    whose attention modules carry a layer_idx works through transformers' AttentionInterface."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # KV head h serves query heads h*g .. h*g+g-1
    value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if _active is not None:
        mask = _active["masks"][module.layer_idx][None]
    else:
        mask = attention_mask
    if mask is not None:
        weights = weights + mask[..., : key.shape[-2]].to(weights.dtype)
    probs = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    if _active is not None and _active["capture"] is not None:
        capture = _active["capture"]
        capture[module.layer_idx] = {"keys": key[0, ::groups].detach(), "probs": probs[0].detach(),
                                     "values": value[0, ::groups].detach()}
    return out, probs


@contextlib.contextmanager
def _per_layer_masks(masks: torch.Tensor, capture: dict | None = None):
    """Make masked_eager_attention use masks[layer_idx] ([heads, T, T] additive). With
    `capture`, record each layer's keys and values [kv_heads, T, D] and probabilities
    [q_heads, T, T]."""
    global _active
    _active = {"masks": masks, "capture": capture}
    try:
        yield
    finally:
        _active = None


def load_reference_model(model_dir: str):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(ATTENTION, masked_eager_attention)
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=ATTENTION).eval()


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
