"""Policy registry and selection rules shared by every policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_evict.core.config import EvictionConfig
from vllm_evict.core.policies import (
    Policy,
    SelectionInput,
    available_policies,
    get_policy_class,
    policy_summaries,
    register_policy,
)


def _input(held: int, target: int, cfg: EvictionConfig, layers=2, heads=2) -> SelectionInput:
    positions = torch.arange(held).expand(layers, heads, -1)
    return SelectionInput("r", positions, held, target, cfg)


def test_streaming_keeps_sinks_and_the_most_recent():
    cfg = EvictionConfig(policy="streaming", budget=40, sink_tokens=4, window=8, slack=0)
    keep = get_policy_class("streaming")().select(_input(100, 40, cfg))
    expected = list(range(4)) + list(range(64, 100))
    assert keep.shape == (2, 2, 40) and all(row.tolist() == expected for row in keep.reshape(4, 40))


@dataclass
class _LowestFirst(Policy):
    """Keeps the oldest tokens: the opposite of recency, to see the protections win."""

    name = "lowest_first"
    summary = "test policy"

    def score(self, inp):
        return -inp.positions.float()


def test_sinks_and_window_are_protected_from_any_score():
    register_policy("lowest_first", _LowestFirst)
    assert "lowest_first" in available_policies() and "lowest_first" in policy_summaries()
    cfg = EvictionConfig(policy="lowest_first", budget=30, sink_tokens=2, window=10, slack=0)
    keep = _LowestFirst().select(_input(100, 30, cfg))[0, 0].tolist()
    assert keep[:2] == [0, 1] and keep[-10:] == list(range(90, 100))
    assert keep[2:20] == list(range(2, 20))  # the rest by score: the oldest
    assert keep == sorted(keep)


def test_none_is_reserved_and_listed_first():
    assert available_policies()[0] == "none"
    try:
        register_policy("none", _LowestFirst)
    except ValueError as exc:
        assert "reserved" in str(exc)
    else:
        raise AssertionError("registering 'none' must fail")


def test_third_party_policies_come_from_the_entry_point_group(tmp_path, monkeypatch):
    """A distribution that declares `[vllm_evict.policies] oldest = pkg:Class` is picked up
    without touching vllm-evict (the same mechanism an installed package uses)."""
    from vllm_evict.core.policies import registry

    (tmp_path / "thirdparty_policy.py").write_text(
        "from dataclasses import dataclass\n"
        "from vllm_evict.core.policies import Policy\n"
        "@dataclass\n"
        "class Oldest(Policy):\n"
        "    name = 'oldest'\n"
        "    summary = 'keeps the oldest tokens'\n"
        "    def score(self, inp):\n"
        "        return -inp.positions.float()\n")
    dist = tmp_path / "thirdparty_policy-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-policy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm_evict.policies]\noldest = thirdparty_policy:Oldest\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    assert "oldest" in available_policies()
    assert policy_summaries()["oldest"] == "keeps the oldest tokens"
    assert EvictionConfig(policy="oldest", budget=50).policy == "oldest"
    assert get_policy_class("oldest").__name__ == "Oldest"
