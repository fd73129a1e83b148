"""Hot restart planning: which flags may change on a running engine, and what each change costs.

Pure functions over configs (no engine, no tensors), so the classification is tested on its own.
A change is, from cheapest to dearest:

- live: the scheduler takes it between two steps (max-running-requests within the slot table,
  chunked-prefill-size); nothing is torn down;
- graphs: only the decode CUDA graphs are re-captured; the KV pool and every request's KV stay;
- rebuild: slot table, attention backend and graphs are built anew with the loaded weights;
  when the KV layout changes (page size, pool size) the pool too, and requests in flight are
  re-prefilled (prompt + the tokens they already generated), else they keep their KV;
- reload: the weights are loaded again (model, dtype, ...), then as rebuild.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, EngineConfig, flag_name

LIVE_FIELDS = frozenset({"max_running_requests", "chunked_prefill_size", "overlap_schedule"})
GRAPH_FIELDS = frozenset({"cuda_graph_max_bs", "disable_cuda_graph"})
REBUILD_FIELDS = frozenset(
    {
        "page_size",
        "kv_cache_dtype",
        "max_total_tokens",
        "mem_fraction_static",
        "context_length",
        "attention_backend",
        "speculative_algorithm",
        "speculative_draft_model_path",
        "speculative_num_steps",
        "speculative_eagle_topk",
        "speculative_num_draft_tokens",
        "disable_radix_cache",
    }
)
RELOAD_FIELDS = frozenset({"model", "tokenizer_path", "load_format", "dtype", "seed"})
# What shapes the KV pool: a rebuild that changes none of these keeps the pool, and every
# running request keeps its pages and its KV (e.g. another attention backend).
KV_LAYOUT_FIELDS = (
    frozenset({"page_size", "kv_cache_dtype", "max_total_tokens", "mem_fraction_static"})
    | RELOAD_FIELDS
)
# Everything else is fixed for the life of the process (the server's address and key, the
# device, the telemetry ring); changing it needs a new process.
FIXED_REASONS = {
    "device": "the engine cannot move to another device while running",
    "host": "the API's address is fixed while it runs",
    "port": "the API's address is fixed while it runs",
    "api_key": "the API key is fixed while the API runs",
    "telemetry_capacity": "the telemetry ring is sized once per session",
}


@dataclass(frozen=True)
class RestartPlan:
    old: EngineConfig  # resolved
    new: EngineConfig  # resolved
    changes: dict[str, tuple[Any, Any]]  # field -> (old, new), resolved values
    mode: str  # none | live | graphs | rebuild | reload

    @property
    def keeps_kv(self) -> bool:
        """True when running requests keep their KV (no re-prefill). A new draft model needs a
        new pool: on a GPU its KV shares the memory budget with the target's."""
        new_draft = self.new.speculative_algorithm in ("draft", "eagle", "eagle3") and bool(
            {"speculative_algorithm", "speculative_draft_model_path"} & set(self.changes)
        )
        # Requests may read the prefix cache's pages: turning it off starts a new pool (turning
        # it on starts an empty cache beside the requests' own pages).
        return (
            self.mode != "reload"
            and not new_draft
            and not (set(self.changes) & KV_LAYOUT_FIELDS)
            and not (self.old.prefix_cache and not self.new.prefix_cache)
        )

    def describe(self) -> str:
        """'--cuda-graph-max-bs 8 -> 32, --max-running-requests 64 -> 32'"""
        if not self.changes:
            return "no change"
        return ", ".join(f"{flag_name(k)} {o} -> {n}" for k, (o, n) in self.changes.items())


def coerce(field_name: str, value: Any) -> Any:
    """`value` as `EngineConfig.<field_name>`'s type: JSON values as they are, or text as typed in
    a form ("32", "true", "" for unset). Raises ConfigError naming the flag."""
    hints = typing.get_type_hints(EngineConfig)
    if field_name not in hints or field_name == "extra":
        raise ConfigError(f"unknown engine setting {field_name!r}")
    hint = hints[field_name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    flag = flag_name(field_name)
    if isinstance(value, str) and base is not str:
        text = value.strip().lower()
        if text in ("", "none", "auto") and optional:
            return None
        if base is bool:
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{flag} must be true or false, got {value!r}")
        try:
            return base(text)
        except ValueError:
            raise ConfigError(f"{flag} must be {_type_words(base)}, got {value!r}") from None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{flag} cannot be unset")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise ConfigError(f"{flag} must be {_type_words(base)}, got {value!r}")
    return value


def _type_words(base: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(
        base, base.__name__
    )


def plan_restart(
    current: EngineConfig,
    changes: Mapping[str, Any],
    device_type: str,
    gpu_memory_gb: float = 0.0,
    slot_capacity: int | None = None,
) -> RestartPlan:
    """Validate `changes` (field -> value) against the running, resolved `current` config.

    `slot_capacity` is how many requests the running engine's slot table holds: raising
    max-running-requests past it needs a rebuild, within it the scheduler takes it live.
    Raises ConfigError, naming the flag, for an unknown field, a bad value or a fixed setting."""
    coerced = {name: coerce(name, value) for name, value in changes.items()}
    for name in coerced:
        if name in FIXED_REASONS and coerced[name] != getattr(current, name):
            raise ConfigError(
                f"{flag_name(name)} cannot change on a running engine: {FIXED_REASONS[name]}"
            )
    new = current.replace(**coerced).resolve(device_type, gpu_memory_gb)
    diff = current.diff(new)
    return RestartPlan(current, new, diff, _mode(diff, new, slot_capacity))


def _mode(diff: Mapping[str, tuple[Any, Any]], new: EngineConfig, slot_capacity: int | None) -> str:
    if not diff:
        return "none"
    fields = set(diff)
    if fields & RELOAD_FIELDS:
        return "reload"
    grow_slots = (
        "max_running_requests" in fields
        and slot_capacity is not None
        and new.max_running_requests > slot_capacity
    )
    if fields & REBUILD_FIELDS or grow_slots:
        return "rebuild"
    if fields & GRAPH_FIELDS:
        return "graphs"
    return "live"
