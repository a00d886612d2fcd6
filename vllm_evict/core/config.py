"""EvictionConfig: what to evict and how much to keep, from flags, additional_config or a request.

The one formula both the scheduler (which frees pages) and the workers (which move KV data)
compute is `EvictionConfig.physical_length(c)`: how many KV entries a request keeps, per
(layer, KV head), once `c` tokens of it have been computed. It depends on nothing else, so the
two sides never need to talk.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from vllm_evict.core.policies.registry import (
    NO_EVICTION,
    available_policies,
    check_policy_args,
    get_policy_class,
)

# The key under additional_config, and the per-request keys in `vllm_xargs` (SamplingParams
# extra_args) with the config field each one overrides.
ADDITIONAL_CONFIG_KEY = "kv_eviction"
REQUEST_KEYS: dict[str, str] = {"kv_eviction": "policy", "kv_budget": "budget"}

logger = logging.getLogger("vllm.evict")


class EvictionConfigError(ValueError):
    """A bad eviction setting. The message names the field and what is allowed."""


class EvictionConfig(BaseModel):
    """Eviction settings of a server (its default) or of one request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = NO_EVICTION
    """Registered policy name; "none" keeps every token (vanilla vLLM)."""
    budget: int = 2048
    """KV entries a request keeps per (layer, KV head) right after a compaction."""
    sink_tokens: int = 4
    """The first tokens of the sequence, always kept (attention sinks)."""
    window: int = 32
    """The most recent tokens, always kept."""
    slack: int = 64
    """How far past the budget a request may grow before it is compacted back to the budget.
    Larger slack means fewer compactions; pages come back in whole pages either way."""

    # Operator limits on what requests may ask for (server settings; requests cannot set them).
    request_override: Literal["allow", "deny"] = "allow"
    """Whether requests may choose their own policy and budget through vllm_xargs."""
    allowed_policies: tuple[str, ...] | None = None
    """Policies requests may choose; None allows every registered policy."""
    budget_min: int | None = None
    """Smallest budget a request may ask for; None: anything above sink_tokens + window."""
    budget_max: int | None = None
    """Largest budget a request may ask for; None: no limit."""
    prefill_eviction: bool = False
    """Compact during prefill too, every `prefill_chunk` prompt tokens once past the cap, so a
    request's peak is about budget + slack + prefill_chunk however long its prompt (opt-in; a
    server setting)."""
    prefill_chunk: int = 512
    """With prefill_eviction: the logical positions (multiples of this) where prefill stops and
    compacts. Fixed points, so the kept sets never depend on how a busy scheduler batches."""
    policy_args: dict[str, dict[str, Any]] = {}
    """Per policy, values for its dataclass fields, e.g. {"snapkv": {"observation_window": 64},
    "pyramidkv": {"beta": 10}}; they apply to every request that runs that policy. A server
    setting: requests choose a policy and a budget, not its parameters."""

    @field_validator("policy", mode="before")
    @classmethod
    def _known_policy(cls, value: Any) -> str:
        names = available_policies()
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"unknown policy {value!r}; allowed: {', '.join(names)}")
        return value

    @field_validator("allowed_policies", mode="before")
    @classmethod
    def _known_policies(cls, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        names = available_policies()
        if not isinstance(value, list | tuple) or not value:
            raise ValueError(f"must be a non-empty list of policies from: {', '.join(names)}")
        unknown = [v for v in value if v not in names]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; allowed: {', '.join(names)}")
        return tuple(value)

    @field_validator("budget_min", "budget_max", mode="before")
    @classmethod
    def _optional_budget(cls, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"must be an integer > 0; got {value!r}")
        return value

    @field_validator("budget", "sink_tokens", "window", "slack", "prefill_chunk", mode="before")
    @classmethod
    def _non_negative_int(cls, value: Any, info: Any) -> int:
        # bool is an int subclass and floats like 2048.5 would be truncated silently: refuse both.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer; got {value!r} ({type(value).__name__})")
        positive = info.field_name in ("budget", "prefill_chunk")
        if value < 0 or (positive and value == 0):
            low = "> 0" if positive else ">= 0"
            raise ValueError(f"must be an integer {low}; got {value}")
        return value

    @field_validator("policy_args", mode="before")
    @classmethod
    def _known_policy_args(cls, value: Any) -> dict[str, dict[str, Any]]:
        if value is None:
            return {}
        if isinstance(value, str):  # the --kv-policy-args flag
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be JSON like {{\"snapkv\": {{\"pool_kernel\": 7}}}}; {exc}") from None
        if not isinstance(value, Mapping):
            raise ValueError(f"must map policy names to their arguments; got {value!r}")
        checked = {}
        for name, args in value.items():
            if name not in available_policies() or name == NO_EVICTION:
                raise ValueError(f"unknown policy {name!r}; allowed: "
                                 f"{', '.join(available_policies()[1:])}")
            checked[name] = check_policy_args(name, args)
        return checked

    @model_validator(mode="after")
    def _budget_holds_protected_tokens(self) -> EvictionConfig:
        protected = self.sink_tokens + self.window
        if self.budget <= protected:
            raise ValueError(
                f"budget must be > sink_tokens + window = {self.sink_tokens} + {self.window} "
                f"= {protected}; got budget={self.budget}"
            )
        if self.budget_min is not None and self.budget_max is not None \
                and self.budget_min > self.budget_max:
            raise ValueError(f"budget_min {self.budget_min} > budget_max {self.budget_max}")
        return self

    # ------------------------------------------------------------------ construction

    @classmethod
    def parse(cls, values: Mapping[str, Any], source: str = ADDITIONAL_CONFIG_KEY) -> EvictionConfig:
        """Validate `values`; raise EvictionConfigError naming `source.field` on any problem."""
        if not isinstance(values, Mapping):
            raise EvictionConfigError(
                f"{source}: expected a mapping of {sorted(cls.model_fields)}; got {values!r}"
            )
        try:
            return cls(**dict(values))
        except ValidationError as exc:
            raise EvictionConfigError(_describe(exc, source)) from None
        except TypeError as exc:  # pragma: no cover - pydantic reports most problems above
            raise EvictionConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> EvictionConfig | None:
        """The server config, or None when the plugin is not enabled for this engine. Parsed
        once per process for each distinct section (vLLM asks per layer and per request)."""
        if not additional_config or ADDITIONAL_CONFIG_KEY not in additional_config:
            return None
        values = additional_config[ADDITIONAL_CONFIG_KEY]
        if isinstance(values, EvictionConfig):
            return values
        if isinstance(values, str):  # `--additional-config '{"kv_eviction": "streaming"}'`
            values = {"policy": values}
        if not isinstance(values, Mapping):
            return cls.parse(values, ADDITIONAL_CONFIG_KEY)  # raises, naming the section
        try:
            key = json.dumps(values, sort_keys=True)
        except TypeError:  # not JSON (a Python caller's objects): parse it uncached
            return cls.parse(values or {}, ADDITIONAL_CONFIG_KEY)
        return _parse_section(key)

    def for_request(self, extra_args: Mapping[str, Any] | None) -> EvictionConfig:
        """This config with a request's `vllm_xargs` overrides applied, validated against the
        operator's limits. Raises EvictionConfigError saying what is allowed."""
        if not extra_args:
            return self
        unknown = [k for k in extra_args if k.startswith("kv_") and k not in REQUEST_KEYS]
        if unknown:
            raise EvictionConfigError(
                f"vllm_xargs: unknown key(s) {unknown}; per-request eviction keys are "
                f"{sorted(REQUEST_KEYS)}"
            )
        updates = {REQUEST_KEYS[k]: v for k, v in extra_args.items() if k in REQUEST_KEYS}
        if not updates:
            return self
        if self.request_override == "deny":
            raise EvictionConfigError(
                f"vllm_xargs {sorted(k for k in extra_args if k in REQUEST_KEYS)}: this server does "
                f"not let requests choose eviction settings (--kv-request-override deny); it "
                f"applies {self.describe()}"
            )
        merged = self.model_dump() | updates
        try:
            cfg = type(self)(**merged)
        except ValidationError as exc:
            names = {v: k for k, v in REQUEST_KEYS.items()}
            raise EvictionConfigError(_describe(exc, "vllm_xargs", names)) from None
        self._check_limits(cfg, "policy" in updates, "budget" in updates)
        return cfg

    def for_request_or_full_cache(self, extra_args: Mapping[str, Any] | None,
                                  request_id: str) -> EvictionConfig:
        """for_request, for the engine side (scheduler, workers), which must never fail a
        request: the API server and LLM() validated it already, so an error here is a last
        guard and the request is served with its full cache. Both sides call this one
        function, so they fall back the same way."""
        try:
            return self.for_request(extra_args)
        except EvictionConfigError as exc:
            logger.warning("vllm-evict: request %s served without eviction: %s", request_id, exc)
            return type(self)()

    def _check_limits(self, cfg: EvictionConfig, chose_policy: bool, chose_budget: bool) -> None:
        allowed = self.allowed_policies
        if chose_policy and allowed is not None and cfg.policy not in allowed \
                and cfg.policy != NO_EVICTION:
            raise EvictionConfigError(
                f"vllm_xargs.kv_eviction: policy {cfg.policy!r} is not allowed on this server; "
                f"allowed: {', '.join((NO_EVICTION, *allowed))}"
            )
        if chose_budget:
            low = self.budget_min or cfg.smallest_budget
            high = self.budget_max
            if cfg.budget < low or (high is not None and cfg.budget > high):
                bound = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise EvictionConfigError(
                    f"vllm_xargs.kv_budget: {cfg.budget} is outside this server's range {bound}"
                )

    # ------------------------------------------------------------------ the length formula

    @property
    def evicts(self) -> bool:
        return self.policy != NO_EVICTION

    @property
    def smallest_budget(self) -> int:
        """The least budget that leaves room past the always-kept sinks and window."""
        return self.sink_tokens + self.window + 1

    @property
    def cap(self) -> int:
        """The most entries a request holds between compactions."""
        return self.budget + self.slack

    @property
    def first_prefill_point(self) -> int:
        """With prefill_eviction: the first multiple of prefill_chunk past the cap, where
        prefill compaction starts."""
        return (self.cap // self.prefill_chunk + 1) * self.prefill_chunk

    def prefill_stop(self, num_computed_tokens: int, num_prompt_tokens: int) -> int | None:
        """The logical length a prefill chunk starting at `num_computed_tokens` must not pass
        (the next prefill compaction point), or None when nothing stops it."""
        if not (self.evicts and self.prefill_eviction) or num_computed_tokens >= num_prompt_tokens:
            return None
        c, chunk = num_computed_tokens, self.prefill_chunk
        stop = max(self.first_prefill_point, (c // chunk + 1) * chunk)
        return stop if stop < num_prompt_tokens else None

    def prefill_segment(self, num_computed_tokens: int, num_prompt_tokens: int) -> tuple[int, int]:
        """[start, end) of the prefill segment that holds the token at `num_computed_tokens`:
        between compaction points (prefill_eviction), else the whole prompt."""
        stop = self.prefill_stop(num_computed_tokens, num_prompt_tokens)
        end = num_prompt_tokens if stop is None else stop
        start = 0
        if self.evicts and self.prefill_eviction and num_computed_tokens >= self.first_prefill_point:
            start = num_computed_tokens // self.prefill_chunk * self.prefill_chunk
        return start, end

    @property
    def bounded_length(self) -> int | None:
        """The most entries any request of this server holds at once, when the server bounds
        every request: prefill eviction on, and requests may not opt out. Then vLLM's start-up
        check that one max_model_len fits in the pool is made against this instead."""
        if not (self.evicts and self.prefill_eviction and self.request_override == "deny"):
            return None
        return self.cap + self.prefill_chunk

    def peak_length(self, num_tokens: int) -> int:
        """The most entries a request of `num_tokens` (prompt + output) holds at once."""
        if not self.evicts:
            return num_tokens
        bound = self.cap + self.prefill_chunk if self.prefill_eviction else None
        return num_tokens if bound is None else min(num_tokens, bound)

    def may_evict(self, num_prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request of this prompt and max_tokens is ever compacted: exact, so a
        request that never is keeps vanilla behaviour (prefix cache included).

        Compaction happens at a step boundary with c computed tokens once c >= the prompt and
        c > budget + slack. The last output token is sampled, never computed, so the largest
        boundary is prompt + max_tokens - 2 (and with max_tokens 1 there is none after the
        prompt)."""
        if self.evicts and self.prefill_eviction and self.first_prefill_point < num_prompt_tokens:
            return True  # compacted during prefill
        return (self.evicts and max_tokens >= 2
                and num_prompt_tokens + max_tokens - 2 > self.cap)

    def physical_length(self, num_computed_tokens: int, num_prompt_tokens: int = 0) -> int:
        """KV entries kept, per (layer, KV head), at a step boundary with `c` computed tokens.

        Nothing is evicted until the whole prompt is computed or while `c` <= budget + slack.
        After that the length cycles budget, budget+1, ..., budget+slack, budget, ...: with one
        token per step the request is compacted back to the budget each time it would pass
        budget+slack. Decode steps add one token each, so the compaction points do not depend
        on batching or on how the prompt was chunked, and a greedy request gives the same tokens
        alone or under load. It is a pure function of (c, prompt length, config), never longer
        than the previous boundary's length plus the tokens computed since, so the scheduler and
        the workers agree without talking.
        """
        c, prompt = num_computed_tokens, num_prompt_tokens
        if not self.evicts or c <= self.cap:
            return c
        if not self.prefill_eviction:
            if c < prompt:
                return c
            return self.budget + (c - self.cap - 1) % (self.slack + 1)
        # Prefill eviction: compacted to the budget at every multiple of prefill_chunk from the
        # first past the cap, then grown by the chunk's tokens.
        chunk, first = self.prefill_chunk, self.first_prefill_point
        if c < prompt:
            return c if c < first else self.budget + c % chunk
        # After the prompt: what its end holds, grown one token per step and compacted back
        # to the budget whenever it would pass the cap (the same cycle as without).
        if prompt <= first:
            held_at_prompt = prompt
        else:
            last_point = (prompt - 1) // chunk * chunk
            held_at_prompt = self.budget + (prompt - last_point)
        first_decode_compaction = prompt + max(0, self.cap + 1 - held_at_prompt)
        if c < first_decode_compaction:
            return held_at_prompt + (c - prompt)
        return self.budget + (c - first_decode_compaction) % (self.slack + 1)

    def prefix_hit_limit(self, num_prompt_tokens: int) -> int:
        """The most prompt tokens a prefix-cache hit may cover for a request that may be
        compacted: the policy must compute every prompt query it reads
        (Policy.prompt_queries_read), so that a cached request selects what a cold one does.
        0: the request does not read the cache (it still publishes its prompt pages)."""
        if not self.shares_pages(num_prompt_tokens):
            return 0
        read = self.build_policy().prompt_queries_read(num_prompt_tokens)
        if read is None:
            return 0
        # Never past the prompt: a preempted request replays its outputs, and a hit that
        # reached a compaction boundary would skip the compaction.
        return max(0, num_prompt_tokens - max(read, 1))

    def shares_pages(self, num_prompt_tokens: int) -> bool:
        """Whether a request that may be compacted takes part in the prefix cache (reads and
        publishes it, and copies on write at its first compaction). Not when it is compacted
        during its prompt (prefill eviction): a hit could cover no more than the first point,
        and copying on write would hold a second set of pages at that point, past the bound
        budget + slack + chunk that prefill eviction promises."""
        return not (self.evicts and self.prefill_eviction
                    and self.first_prefill_point < num_prompt_tokens)

    def build_policy(self):
        """This config's policy object, with its policy_args."""
        policy = get_policy_class(self.policy)(**self.policy_args.get(self.policy, {}))
        if self.prefill_eviction:
            policy.segments = self.prefill_segment
        return policy

    def describe(self) -> str:
        text = (f"policy={self.policy} budget={self.budget} sink_tokens={self.sink_tokens} "
                f"window={self.window} slack={self.slack}")
        if self.prefill_eviction:
            text += f" prefill_eviction=on prefill_chunk={self.prefill_chunk}"
        if self.policy_args:
            text += f" policy_args={json.dumps(self.policy_args, sort_keys=True)}"
        if self.request_override == "deny":
            return text + "; requests may not override"
        limits = [f"policies {', '.join(self.allowed_policies)}" if self.allowed_policies else "",
                  f"budget >= {self.budget_min}" if self.budget_min else "",
                  f"budget <= {self.budget_max}" if self.budget_max else ""]
        limits = [x for x in limits if x]
        return text + "; requests may override" + (f" within {', '.join(limits)}" if limits else "")


@functools.lru_cache(maxsize=64)
def _parse_section(section_json: str) -> EvictionConfig:
    return EvictionConfig.parse(json.loads(section_json), ADDITIONAL_CONFIG_KEY)


def resolve_request(additional_config: Mapping[str, Any] | None,
                    extra_args: Mapping[str, Any] | None) -> EvictionConfig | None:
    """The config a request runs with, from the engine's additional_config and the request's
    vllm_xargs (None: the plugin is off for this engine). Raises EvictionConfigError for a
    request the operator's settings do not allow, saying what is allowed."""
    server = EvictionConfig.from_additional_config(additional_config)
    if server is None:
        asked = sorted(k for k in (extra_args or {}) if k in REQUEST_KEYS)
        if asked:
            raise EvictionConfigError(
                f"vllm_xargs {asked}: KV eviction is not enabled on this server; the operator "
                "must start it with --kv-eviction POLICY (or --kv-eviction none to let requests "
                "choose)"
            )
        return None
    return server.for_request(extra_args)


def _describe(exc: ValidationError, source: str, rename: Mapping[str, str] | None = None) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if rename and loc in rename:
            loc = rename[loc]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; allowed fields: {', '.join(EvictionConfig.model_fields)}"
        parts.append(f"{source}.{loc}: {msg}" if loc else f"{source}: {msg}")
    return "; ".join(parts)
