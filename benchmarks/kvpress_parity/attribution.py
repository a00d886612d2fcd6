"""Attribution: kvpress's scoring rebuilt from the recorded keys and attention (checked
against what kvpress kept), our policies run on the same Hugging Face tensors, one-factor
variants that name each difference of definition, and the set comparisons."""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.kvpress_parity import PROTECT, SNAP_KERNEL, SNAP_WINDOW

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------- scoring replicas (torch)

SNAP_STEPS = {  # kvpress's SnapKV scoring, switched to ours one factor at a time (cumulative)
    "max-pool (ours) instead of avg-pool": {"pool": "max"},
    "+ pool after the GQA-group reduction (ours) instead of per query head":
        {"pool": "max", "pool_after_group": True},
    "+ pool across the window boundary (ours) instead of the pre-window scores only":
        {"pool": "max", "pool_after_group": True, "pool_window_too": True},
}


TOVA_VARIANT = "per KV head's group (ours) instead of all query heads"
KEYDIFF_VARIANT = "anchor = normalized mean key (ours) instead of mean unit key"
PYRAMID_BUDGETS = "our per-layer budgets instead of kvpress's"
PYRAMID_POOLING = "+ SnapKV pooling as ours (the three snapkv factors)"


def kvpress_replica_scores(policy: str, probe: dict, ratio: float, *, pool: str = "avg",
                           pool_after_group: bool = False, pool_window_too: bool = False,
                           head_average: str = "all", anchor: str = "normalized") -> torch.Tensor:
    """kvpress's score() for every layer [layers, kv_heads, L], rebuilt from the probe. The
    defaults are kvpress's; each keyword switches one factor to our definition: SnapKV's pool
    ("avg" / "max"), whether it pools per query head before averaging the GQA group or after
    reducing it, and whether it pools the pre-window scores only (zero-padded) or the whole
    prompt; TOVA's head_average ("all" query heads / each KV head's "group"); KeyDiff's anchor
    (mean of the "normalized" keys / normalized mean of the "raw" keys)."""
    import torch
    import torch.nn.functional as F

    keys = probe["keys"]  # [layers, kv, L, D]
    layers, kv, length, _ = keys.shape
    heads = probe["window"].shape[1]
    group = heads // kv
    if policy == "knorm":
        return -keys.float().norm(dim=-1)
    if policy == "keydiff":
        if anchor == "normalized":
            center = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)
        else:
            center = keys.mean(dim=2, keepdim=True)
        return -F.cosine_similarity(keys, center, dim=-1)
    if policy == "streaming":
        n_pruned = length - int(length * (1 - ratio))
        scores = torch.ones(layers, kv, length)
        scores[:, :, PROTECT["streaming"][0]: PROTECT["streaming"][0] + n_pruned] = 0
        return scores
    if policy == "tova":
        last = probe["last"][:, :, :-1]  # [layers, heads, L-1]
        if head_average == "all":
            s = last.mean(1, keepdim=True).expand(layers, kv, length - 1)
        else:
            s = last.view(layers, kv, group, length - 1).mean(2)
        top = s.amax(dim=(1, 2), keepdim=True) + 1
        return torch.cat([s, top.expand(layers, kv, 1)], dim=-1)
    # snapkv / pyramidkv: mean attention of the window queries over the pre-window keys, pooled
    # per query head, averaged over the GQA group, the window padded with max + 1.
    pre = length - SNAP_WINDOW
    s = probe["window"] / SNAP_WINDOW  # [layers, heads, L]
    if not pool_window_too:
        s = s[..., :pre]
    if pool_after_group:
        s = s.view(layers, kv, group, -1).mean(2)
    rows = s.shape[1]
    pool_fn = F.avg_pool1d if pool == "avg" else F.max_pool1d
    s = pool_fn(s.reshape(layers * rows, 1, -1), SNAP_KERNEL, stride=1,
                padding=SNAP_KERNEL // 2).view(layers, rows, -1)[..., :pre]
    if not pool_after_group:
        s = s.view(layers, kv, group, pre).mean(2)
    top = s.amax(dim=(1, 2), keepdim=True) + 1
    return torch.cat([s, top.expand(layers, kv, SNAP_WINDOW)], dim=-1)


def topk_sets(scores, counts: list[int]) -> list[list[list[int]]]:
    """Per layer, the top-`counts[layer]` indices of scores [layers, kv, L], sorted."""
    return [scores[layer].topk(n, dim=-1).indices.sort(dim=-1).values.tolist()
            for layer, n in enumerate(counts)]


NO_REPLICA = {"h2o", "expected_attention"}
"""Policies whose scores need more than the probe records (every query's attention; the queries
before RoPE): no rebuild of kvpress's scoring and no run of ours on HF's tensors."""


def ours_on_hf(policy: str, probe: dict, budget: int, args: dict | None = None
               ) -> list[list[list[int]]] | None:
    """Our policy (its real code and scoring references, with `args`) run on HF's keys and
    attention; None for the NO_REPLICA policies."""
    if policy in NO_REPLICA:
        return None
    import torch

    from vllm_evict.core.config import EvictionConfig
    from vllm_evict.core.policies import SelectionInput, get_policy_class
    from vllm_evict.kernels.scoring import window_scores_reference

    keys = probe["keys"]
    layers, kv, length, _ = keys.shape
    group = probe["window"].shape[1] // kv
    sinks, window = PROTECT[policy]
    cfg = EvictionConfig(policy=policy, budget=budget, sink_tokens=sinks, window=window, slack=0)
    scores = None
    if policy == "tova":  # the latest query's probabilities summed over the GQA group
        scores = probe["last"].view(layers, kv, group, length).sum(2)
    elif policy in ("snapkv", "pyramidkv"):  # window sum per KV head, max-pooled
        summed = probe["window"].view(layers, kv, group, length).sum(2)
        scores = torch.stack([window_scores_reference(s[None], SNAP_KERNEL) for s in summed])
    positions = torch.arange(length).expand(layers, kv, length).clone()
    inp = SelectionInput(request_id="hf", positions=positions, num_computed_tokens=length,
                         target_length=budget, config=cfg, scores=scores, keys=keys)
    policy_obj = get_policy_class(policy)(**(args or {}))
    keep = policy_obj.select(inp)
    kept = positions.gather(-1, keep)
    visible = policy_obj.visible(inp, keep)
    if visible is None:
        return kept.tolist()
    return [[row[mask].tolist() for row, mask in zip(layer, vis, strict=True)]
            for layer, vis in zip(kept, visible, strict=True)]


def our_layer_budgets(policy: str, budget: int, layers: int) -> list[int]:
    if policy != "pyramidkv":
        return [budget] * layers
    from types import SimpleNamespace

    from vllm_evict.core.config import EvictionConfig
    from vllm_evict.core.policies.pyramidkv import PyramidKVPolicy

    sinks, window = PROTECT[policy]
    cfg = EvictionConfig(policy=policy, budget=budget, sink_tokens=sinks, window=window, slack=0)
    return PyramidKVPolicy().layer_budgets(SimpleNamespace(config=cfg), layers)


# ---------------------------------------------------------------------- comparison

def jaccard(a: list[list[list[int]]], b: list[list[list[int]]]) -> list[list[float]]:
    """[layer][kv_head] Jaccard of two kept-set collections."""
    out = []
    for la, lb in zip(a, b, strict=True):
        row = []
        for ha, hb in zip(la, lb, strict=True):
            sa, sb = set(ha), set(hb)
            row.append(len(sa & sb) / len(sa | sb) if sa | sb else 1.0)
        out.append(row)
    return out


def overlap(a: list[list[list[int]]], b: list[list[list[int]]]) -> list[list[float]]:
    """[layer][kv_head] |A & B| / min(|A|, |B|): 1 when the smaller set lies inside the other."""
    return [[len(set(ha) & set(hb)) / max(1, min(len(ha), len(hb)))
             for ha, hb in zip(la, lb, strict=True)] for la, lb in zip(a, b, strict=True)]


def only_ties(a: list[list[list[int]]], b: list[list[list[int]]], scores) -> bool:
    """Whether every token in one set but not the other has an exact score twin on the other
    side: the two selections differ only in how top-k broke ties."""
    for layer, (la, lb) in enumerate(zip(a, b, strict=True)):
        for head, (ha, hb) in enumerate(zip(la, lb, strict=True)):
            row = scores[layer, head]
            only_a = sorted(row[i].item() for i in set(ha) - set(hb))
            only_b = sorted(row[i].item() for i in set(hb) - set(ha))
            if only_a != only_b:
                return False
    return True


def summary(grid: list[list[float]]) -> dict:
    flat = [x for row in grid for x in row]
    return {"mean": sum(flat) / len(flat), "min": min(flat),
            "per_layer": [sum(row) / len(row) for row in grid]}


def compare_case(case: dict, kvp_layers: list[dict], ours: list, probe: dict) -> dict:
    policy, ratio = case["policy"], case["ratio"]
    layers = len(kvp_layers)
    kvp = [entry["kept"] for entry in kvp_layers]
    kvp_counts = [entry["n_kept"] for entry in kvp_layers]
    budget = case["budget"]
    ours_counts = [len(layer[0]) for layer in ours]
    hf_ours = ours_on_hf(policy, probe, budget, case["args"])
    replica = (None if policy in NO_REPLICA else
               topk_sets(kvpress_replica_scores(policy, probe, ratio), kvp_counts))
    grid = jaccard(ours, kvp)
    result = {
        "policy": policy, "args": case["args"], "ratio": ratio, "prompt": case["prompt"],
        "prompt_tokens": case["length"],
        "press": case["press"], "our_config": {"budget": budget, "sink_tokens": PROTECT[policy][0],
                                               "window": PROTECT[policy][1], "slack": 0},
        "kvpress_kept_per_layer": kvp_counts, "ours_kept_per_layer": ours_counts,
        "kvpress_capture_verified": all(entry["verified"] for entry in kvp_layers),
        "jaccard": grid, **{k: v for k, v in summary(grid).items()},
        "overlap_coefficient": summary(overlap(ours, kvp)),
        "swapped_tokens": sum(len(set(a) - set(b)) for la, lb in zip(ours, kvp, strict=True)
                              for a, b in zip(la, lb, strict=True)),
        "rows_differing": sum(set(a) != set(b) for la, lb in zip(ours, kvp, strict=True)
                              for a, b in zip(la, lb, strict=True)),
        "rows": sum(len(layer) for layer in ours),
        "best_head_per_layer_mean": sum(max(row) for row in grid) / len(grid),
        "worst_head_per_layer_mean": sum(min(row) for row in grid) / len(grid),
        "jaccard_upper_bound_per_layer": [min(a, b) / max(a, b)
                                          for a, b in zip(kvp_counts, ours_counts, strict=True)],
        "checks": {  # None: not available for this policy (NO_REPLICA)
            "kvpress_vs_kvpress_replica": replica and summary(jaccard(kvp, replica)),
            "ours_vllm_vs_ours_on_hf": hf_ours and summary(jaccard(ours, hf_ours)),
            "kvpress_vs_ours_on_hf": hf_ours and summary(jaccard(kvp, hf_ours)),
        },
        "variants": {},
    }
    if policy == "knorm":  # how close are the norms of the tokens the two sides swap?
        norms = probe["keys"].float().norm(dim=-1)
        gaps = [0.0]
        for layer, (la, lb) in enumerate(zip(ours, kvp, strict=True)):
            for head, (a, b) in enumerate(zip(la, lb, strict=True)):
                only_a = sorted(norms[layer, head, i].item() for i in set(a) - set(b))
                only_b = sorted(norms[layer, head, i].item() for i in set(b) - set(a))
                gaps += [abs(x - y) / x for x, y in zip(only_a, only_b, strict=True)]
        result["swapped_max_relative_norm_gap"] = max(gaps)
    variants = {}
    if policy == "snapkv":
        for name, switch in SNAP_STEPS.items():
            variants[name] = topk_sets(kvpress_replica_scores(policy, probe, ratio, **switch),
                                       kvp_counts)
    if policy == "tova" and case["args"].get("heads") != "shared":
        variants[TOVA_VARIANT] = topk_sets(
            kvpress_replica_scores(policy, probe, ratio, head_average="group"), kvp_counts)
    if policy == "keydiff":
        variants[KEYDIFF_VARIANT] = topk_sets(
            kvpress_replica_scores(policy, probe, ratio, anchor="raw"), kvp_counts)
    if policy == "pyramidkv":
        budgets = our_layer_budgets(policy, budget, layers)
        result["our_layer_budgets"] = budgets
        variants[PYRAMID_BUDGETS] = topk_sets(
            kvpress_replica_scores(policy, probe, ratio), budgets)
        last = kvpress_replica_scores(policy, probe, ratio, **list(SNAP_STEPS.values())[-1])
        variants[PYRAMID_POOLING] = topk_sets(last, budgets)
        result["residual_only_exact_ties"] = only_ties(ours, variants[PYRAMID_POOLING], last)
    for name, sets in variants.items():
        result["variants"][name] = summary(jaccard(ours, sets))
    return result
