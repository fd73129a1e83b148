"""What the panels show, folded from telemetry records: pure state, no widgets, no clock reads.

`ConsoleModel.apply(records)` is called by the refresh timer (≤10 Hz) with whatever arrived
since the last call; panels then read the derived values. It also keeps every record of the
session, for the CSV export.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llmconsole.core.telemetry import (
    EngineEvent,
    LiveRequest,
    Record,
    RequestRecord,
    StepRecord,
    read_rate,
)


@dataclass
class SecondBucket:
    """What happened during one wall-clock second."""

    second: int
    generated: int = 0
    steps: int = 0
    running: int = 0  # largest running set seen
    queue: int = 0  # longest queue seen
    cached_tokens: int = 0  # tokens the requests admitted this second read from the prefix cache
    admitted_tokens: int = 0  # all tokens of those requests at admission

    @property
    def hit_rate(self) -> float | None:
        """Prefix-cache hit rate of this second's admissions; None when nothing was admitted."""
        return self.cached_tokens / self.admitted_tokens if self.admitted_tokens else None


@dataclass
class SpecStats:
    """SGLang's definitions: accept length = (accepted + batch) / per-request forward passes;
    accept rate = accepted / drafted."""

    verify_steps: int = 0
    forward_passes: int = 0  # sum of batch sizes over verify steps
    drafted: int = 0
    accepted: int = 0
    per_position: list[int] = field(default_factory=list)  # accepted at draft position k

    @property
    def accept_length(self) -> float | None:
        if not self.forward_passes:
            return None
        return (self.accepted + self.forward_passes) / self.forward_passes

    @property
    def accept_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def position_rates(self) -> list[float]:
        """Share of per-request forward passes whose k-th draft token was accepted."""
        if not self.forward_passes:
            return []
        return [n / self.forward_passes for n in self.per_position]

    def add(self, step: StepRecord) -> None:
        self.verify_steps += 1
        self.forward_passes += step.batch_size
        self.drafted += step.drafted_tokens
        self.accepted += step.accepted_tokens
        for k, n in enumerate(step.accepted_per_position):
            if k == len(self.per_position):
                self.per_position.append(0)
            self.per_position[k] += n


@dataclass(frozen=True)
class Changes:
    steps: bool = False
    requests: bool = False
    events: tuple[EngineEvent, ...] = ()


class ConsoleModel:
    def __init__(self, strip_steps: int = 1024, chart_seconds: int = 120) -> None:
        self.steps: deque[StepRecord] = deque(maxlen=strip_steps)
        self.chart_seconds = chart_seconds
        self.seconds: deque[SecondBucket] = deque(maxlen=chart_seconds)
        self.finished: deque[RequestRecord] = deque(maxlen=1000)
        self.events: deque[EngineEvent] = deque(maxlen=1000)
        self.session: list[Record] = []  # everything, in arrival order, for export
        self.spec = SpecStats()
        self.live: tuple[LiveRequest, ...] = ()
        self._live_shape: tuple[tuple[str, str], ...] = ()
        self.total_generated = 0
        self.total_steps = 0
        self.finished_ok = 0
        self.finished_failed = 0
        self.last_step: StepRecord | None = None
        self.bytes_recorded = False  # a step carried bytes_read (recordings before it: none do)
        self._flushed = False  # a prefix-cache flush since the last step: nothing reclaimable
        # step_id of the first step after each hot restart -> the restart's message
        self.restart_steps: dict[int, str] = {}
        self._restart_pending: str | None = None
        # flags changed by restarts or live changes since the session began (a replay's
        # header otherwise only knows the flags it started with)
        self.config_changes: dict[str, Any] = {}

    def apply(self, records: Iterable[Record]) -> Changes:
        steps = requests = False
        events: list[EngineEvent] = []
        for rec in records:
            self.session.append(rec)
            if isinstance(rec, StepRecord):
                self._add_step(rec)
                steps = True
            elif isinstance(rec, RequestRecord):
                self.finished.append(rec)
                if rec.finish_reason in ("error", "abort") or rec.error:
                    self.finished_failed += 1
                else:
                    self.finished_ok += 1
                requests = True
            else:
                self._add_event(rec)
                events.append(rec)
        return Changes(steps, requests, tuple(events))

    def _add_event(self, event: EngineEvent) -> None:
        self.events.append(event)
        if event.kind == "cache_flush":
            self._flushed = True
        if event.kind == "restart_begin":
            self._restart_pending = event.message
        elif event.data.get("restart_rejected"):
            self._restart_pending = None
        if event.kind in ("restart_end", "config_change"):
            for name, change in event.data.get("changes", {}).items():
                self.config_changes[name] = change[1]

    def set_live(self, live: tuple[LiveRequest, ...]) -> bool:
        """True when a request arrived, finished or changed state since the last call (token
        counts alone do not count: the table shows those at a calmer rate)."""
        shape = tuple((r.rid, r.state) for r in live)
        changed = shape != self._live_shape
        self.live, self._live_shape = live, shape
        return changed

    def _add_step(self, step: StepRecord) -> None:
        if self._restart_pending is not None:
            self.restart_steps[step.step_id] = self._restart_pending
            self._restart_pending = None
        self.steps.append(step)
        self.last_step = step
        self._flushed = False
        self.total_steps += 1
        self.total_generated += step.num_generated
        self.bytes_recorded = self.bytes_recorded or step.bytes_read > 0
        if step.kind == "verify":
            self.spec.add(step)
        second = int(step.time)
        if not self.seconds or second > self.seconds[-1].second:
            if self.seconds:  # seconds with no step are zeros on the chart, not gaps
                first_missing = max(self.seconds[-1].second + 1, second - self.chart_seconds)
                self.seconds.extend(SecondBucket(s) for s in range(first_missing, second))
            self.seconds.append(SecondBucket(second))
        bucket = self.seconds[-1]
        bucket.generated += step.num_generated
        bucket.steps += 1
        bucket.running = max(bucket.running, step.running)
        bucket.queue = max(bucket.queue, step.queue_len)
        bucket.cached_tokens += step.cached_tokens
        bucket.admitted_tokens += step.admitted_tokens

    # ---- derived values ------------------------------------------------------------------------

    def tokens_per_s(self, now: float, window_s: float = 3.0) -> float:
        """Output tokens per second over the last `window_s` seconds of steps."""
        total = 0
        for step in reversed(self.steps):
            if step.time < now - window_s:
                break
            total += step.num_generated
        return total / window_s

    def decode_read_rate(self, now: float, window_s: float = 3.0) -> float | None:
        """Bytes per second decode steps read over the last `window_s` seconds (read_rate)."""
        recent = itertools.takewhile(lambda s: s.time >= now - window_s, reversed(self.steps))
        return read_rate((s.bytes_read, s.duration_s) for s in recent if s.kind == "decode")

    def chart_series(self, now: float) -> tuple[list[float], list[float], list[float], list[float]]:
        """x = seconds relative to now (≤ 0), output tok/s, running, queue: one point a second,
        the current (incomplete) second left out."""
        current = int(now)
        xs: list[float] = []
        toks: list[float] = []
        running: list[float] = []
        queue: list[float] = []
        for bucket in self.seconds:
            if bucket.second >= current:
                continue
            xs.append(float(bucket.second - current))
            toks.append(float(bucket.generated))
            running.append(float(bucket.running))
            queue.append(float(bucket.queue))
        return xs, toks, running, queue

    def kv_usage(self) -> tuple[int, int, int]:
        """(pages in use, reclaimable pages only the prefix cache holds, usable pages)."""
        step = self.last_step
        if step is None:
            return 0, 0, 0
        # A flush frees every page the cache holds alone, and there may be no step after it.
        cached = 0 if self._flushed else step.kv_pages_cached
        return step.kv_pages_used, cached, step.kv_pages_total

    def hit_rate_series(self, now: float, seconds: int) -> list[float | None]:
        """The prefix-cache hit rate of each of the last `seconds` seconds, oldest first, the
        current one included (a ratio, so a second not yet over is not biased); None for a
        second that admitted nothing."""
        current = int(now)
        rates: dict[int, float | None] = {
            b.second: b.hit_rate for b in self.seconds if current - seconds < b.second <= current
        }
        return [rates.get(s) for s in range(current - seconds + 1, current + 1)]

    def prefix_hit_rate(self, now: float, window_s: int = 10) -> float | None:
        """Cached / admitted tokens over the requests admitted in the last `window_s` seconds
        (tokens, not a mean of per-second rates: a busy second weighs more); None when none."""
        current = int(now)
        window = [b for b in self.seconds if current - window_s < b.second <= current]
        admitted = sum(b.admitted_tokens for b in window)
        return sum(b.cached_tokens for b in window) / admitted if admitted else None
