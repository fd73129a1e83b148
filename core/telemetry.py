"""Telemetry records and the bounded ring buffer every reader (console, /metrics, CSV) shares.

The engine thread appends one `StepRecord` per step, a `RequestRecord` per finished request and
an `EngineEvent` per lifecycle change: O(1), no I/O. Readers poll with a cursor; a slow reader
loses the oldest records (counted in `Subscription.dropped`), never blocks the engine.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import itertools
import json
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar


@dataclass(frozen=True)
class StepRecord:
    step_id: int
    time: float  # wall clock at the end of the step (epoch seconds)
    kind: str  # prefill | decode | mixed | verify
    batch_size: int
    num_tokens: int  # tokens run through the model
    num_generated: int  # tokens sampled this step
    cuda_graph: bool
    padded_bs: int
    duration_s: float
    queue_len: int
    running: int
    kv_pages_used: int
    kv_pages_total: int
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    retracted: int = 0
    # accepted drafts at draft position 0, 1, ... summed over the batch (speculative steps only)
    accepted_per_position: tuple[int, ...] = ()
    # Prefix cache. Defaults keep recordings from before these fields loading.
    kv_pages_cached: int = 0  # pages only the cache holds: reclaimable, not in kv_pages_used
    cached_tokens: int = 0  # tokens this step's newly admitted requests read from the cache
    # all tokens of those requests at admission (the prompt, plus the output so far after a
    # retraction): the hit rate's denominator, never below cached_tokens
    admitted_tokens: int = 0
    # Bytes the step's forward pass reads at least: the weights it multiplies by and the KV of
    # the positions it attends to (core/read_bytes.py; the target model's pass, not a drafter's).
    # / duration_s: the memory rate a decode step ran at.
    bytes_read: int = 0


@dataclass(frozen=True)
class RequestRecord:
    rid: str
    arrival: float
    first_token: float | None
    finish: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    accepted_draft_tokens: int
    finish_reason: str
    retractions: int = 0
    error: str = ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e_s(self) -> float:
        return self.finish - self.arrival

    @property
    def time(self) -> float:
        """When the record was written (every record has a `time`, for ordering)."""
        return self.finish


@dataclass(frozen=True)
class EngineEvent:
    time: float
    kind: str  # start | config_change | restart_begin | restart_end | error | shutdown
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LiveRequest:
    """One unfinished request as the engine saw it at `Engine.live_requests()` time; built only
    when a reader asks, so a headless engine pays nothing for it."""

    rid: str
    state: str  # queued | prefill | decode
    arrival: float
    first_token: float | None
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    computed_tokens: int  # tokens whose KV is in the cache
    retractions: int = 0
    accepted_draft_tokens: int = 0

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.arrival)

    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    def tokens_per_s(self, now: float) -> float | None:
        """Decode speed since the first token (None before there are two tokens to time)."""
        if self.first_token is None or self.generated_tokens < 2 or now <= self.first_token:
            return None
        return (self.generated_tokens - 1) / (now - self.first_token)


Record = StepRecord | RequestRecord | EngineEvent
R = TypeVar("R")


class TelemetryBuffer:
    """A bounded ring of records with a global sequence number. Appends take a lock for O(1)."""

    def __init__(self, capacity: int) -> None:
        self._ring: deque[tuple[int, Record]] = deque(maxlen=capacity)
        self._next_seq = 0
        self._lock = threading.Lock()

    def append(self, record: Record) -> None:
        with self._lock:
            self._ring.append((self._next_seq, record))
            self._next_seq += 1

    def since(self, seq: int) -> tuple[list[Record], int, int]:
        """Records with sequence >= seq, the next cursor, and how many were already overwritten.
        Costs O(new records), not O(buffer): readers poll this several times a second."""
        with self._lock:
            next_seq = self._next_seq
            first = next_seq - len(self._ring)
            wanted = next_seq - max(seq, first)
            tail = list(itertools.islice(reversed(self._ring), max(0, wanted)))
        tail.reverse()
        return [r for _, r in tail], next_seq, max(0, first - seq)

    def snapshot(self) -> list[Record]:
        return self.since(0)[0]

    def subscribe(self) -> Subscription:
        return Subscription(self)


class Subscription:
    """One reader's cursor: `poll()` returns what arrived since the last poll."""

    def __init__(self, buffer: TelemetryBuffer, from_start: bool = True) -> None:
        self._buffer = buffer
        self._cursor = 0 if from_start else buffer.since(1 << 62)[1]
        self.dropped = 0

    def poll(self) -> list[Record]:
        records, self._cursor, dropped = self._buffer.since(self._cursor)
        self.dropped += dropped
        return records


def of_type(records: Iterable[Record], kind: type[R]) -> list[R]:
    return [r for r in records if isinstance(r, kind)]


# ---- CSV export -------------------------------------------------------------------------------

_TIME_FIELDS = {"time", "arrival", "first_token", "finish"}


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat(timespec="microseconds")


def write_csv(path: Path, records: Iterable[Any], record_type: type) -> int:
    """One header row, one row per record; times as ISO 8601 UTC so pandas parses them, event
    data as JSON (`df["data"].map(json.loads)`)."""
    names = [f.name for f in dataclasses.fields(record_type)]
    count = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for rec in records:
            row = []
            for name in names:
                value = getattr(rec, name)
                if name in _TIME_FIELDS:
                    value = _iso(value)
                elif isinstance(value, dict):  # event data, nested: one JSON object per cell
                    value = json.dumps(value, default=str) if value else ""
                elif isinstance(value, tuple):
                    value = ";".join(map(str, value))
                row.append(value)
            writer.writerow(row)
            count += 1
    return count


def export_session(records: Iterable[Record], folder: Path) -> dict[str, int]:
    """Write steps.csv, requests.csv and events.csv into `folder`; returns row counts."""
    folder.mkdir(parents=True, exist_ok=True)
    records = list(records)
    return {
        "steps.csv": write_csv(folder / "steps.csv", of_type(records, StepRecord), StepRecord),
        "requests.csv": write_csv(
            folder / "requests.csv", of_type(records, RequestRecord), RequestRecord
        ),
        "events.csv": write_csv(folder / "events.csv", of_type(records, EngineEvent), EngineEvent),
    }


def read_rate(reads: Iterable[tuple[int, float]]) -> float | None:
    """Bytes per second of steps given as (bytes read, seconds): their bytes over their own
    time, so idle gaps between steps do not dilute it. None when no step carries bytes (a
    recording from before the count)."""
    total = busy = 0.0
    for nbytes, seconds in reads:
        if nbytes:
            total += nbytes
            busy += seconds
    return total / busy if busy > 0 else None
