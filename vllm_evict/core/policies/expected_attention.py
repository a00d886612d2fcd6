"""Expected Attention (Devoto et al., 2025; kvpress's ExpectedAttentionPress): the attention
future queries are expected to pay each key, from the statistics of the queries so far.

Queries before RoPE are modelled as Gaussian (mean mu, covariance S per query head, over every
query after the first `skip_queries`). A query at a future position t is R_t q; averaging R_t
over the next `future_positions` positions gives R, so k . q has mean k . R mu and variance
k^T R S R^T k. Then E[exp(k . q / sqrt(d))] = exp(k . R mu / sqrt(d) + k^T R S R^T k / (2d)):
the scores are its softmax over the held keys (the sinks excluded), averaged over each KV
head's query group and weighted by the value's norm. No attention weights are needed, only the
queries and the held keys and values. Queries reach vLLM's attention already rotated, so the
attention wrapper un-rotates them (core/rope.py) before adding them to the running sums.
"""

from dataclasses import dataclass

import torch

from vllm_evict.core.observation import Observation, Observe
from vllm_evict.core.policies.base import Policy, SelectionInput, Statistic


@dataclass
class ExpectedAttentionPolicy(Policy):
    name = "expected_attention"
    summary = ("attention expected from future queries: mean and covariance of the queries "
               "before RoPE, rotated over the next 512 positions, times |value| (Expected "
               "Attention); needs no attention weights")
    statistic = Statistic.QUERY_MOMENTS
    heads: str = "shared"  # measured: docs/quality.md, "Head aggregation"
    future_positions: int = 512
    skip_queries: int = 4
    """The first queries, left out of the statistics (outliers at the attention sinks)."""
    use_covariance: bool = True
    use_value_norm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.future_positions < 1 or self.skip_queries < 0:
            raise ValueError("future_positions must be >= 1 and skip_queries >= 0")

    def observation(self, row: int, num_computed_tokens: int, num_scheduled_tokens: int,
                    num_prompt_tokens: int) -> Observation | None:
        return Observation(row, Observe.QUERY_MOMENTS, first_position=num_computed_tokens,
                           window_from=max(0, self.skip_queries - num_computed_tokens))

    def score(self, inp: SelectionInput) -> torch.Tensor:
        if inp.keys is None or inp.values is None or inp.query_moments is None or inp.rope is None:
            raise ValueError("expected_attention needs keys, values, query moments and RoPE")
        means, covs = inp.query_moments.mean_and_covariance()  # [L, Hq, D], [L, Hq, D, D]
        layers, kv_heads, held, dim = inp.keys.shape
        group = means.shape[1] // kv_heads
        rot = inp.rope.mean_rotation(inp.num_computed_tokens, self.future_positions, dim)
        rot = rot.to(means.device)
        scores = torch.empty(layers, kv_heads, held, dtype=torch.float32, device=means.device)
        for layer in range(layers):  # one layer's [Hq, P, D] at a time bounds the memory
            keys = inp.keys[layer].float().repeat_interleave(group, dim=0)
            logits = keys @ (means[layer] @ rot.T)[:, :, None] / dim ** 0.5  # [Hq, P, 1]
            logits = logits[..., 0]
            if self.use_covariance:
                cov = rot @ covs[layer] @ rot.T
                logits += ((keys @ cov) * keys).sum(-1) / (2 * dim)
            sinks = inp.positions[layer].repeat_interleave(group, dim=0) < inp.config.sink_tokens
            probs = logits.masked_fill(sinks, float("-inf")).softmax(dim=-1)
            scores[layer] = probs.view(kv_heads, group, held).mean(dim=1)
        if self.use_value_norm:
            scores = (scores + self.epsilon) * inp.values.float().norm(dim=-1)
        return scores  # the sinks are kept by selection (ranked_scores)
