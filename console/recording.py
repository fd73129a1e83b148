"""Session recordings: the telemetry stream as JSON Lines, written while the console runs
(`--record FILE`) and read back by `llmconsole replay` and `llmconsole export`.

Line 1 is a header (`{"type": "session", "version": 1, "engine": <Engine.describe()>, ...}`);
every other line is one record: `step`, `request`, `event` (the engine's telemetry records,
field for field) or `live` (a snapshot of the unfinished requests, taken a few times a second,
so a replay can fill the request table). Lines are in time order.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from llmconsole.core.telemetry import (
    EngineEvent,
    LiveRequest,
    Record,
    RequestRecord,
    StepRecord,
    Subscription,
)

FORMAT_VERSION = 1
_TYPES: dict[str, type] = {"step": StepRecord, "request": RequestRecord, "event": EngineEvent}
_NAMES = {cls: name for name, cls in _TYPES.items()}


class RecordingError(ValueError):
    """A recording that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class LiveSnapshot:
    time: float
    requests: tuple[LiveRequest, ...]


@dataclass(frozen=True)
class Recording:
    path: Path
    engine: dict[str, Any]  # Engine.describe() at the start
    api_url: str
    started: float
    entries: tuple[Record | LiveSnapshot, ...]  # in time order

    @property
    def end(self) -> float:
        return self.entries[-1].time if self.entries else self.started

    def records(self) -> list[Record]:
        return [e for e in self.entries if not isinstance(e, LiveSnapshot)]


def encode(entry: Record | LiveSnapshot) -> dict[str, Any]:
    if isinstance(entry, LiveSnapshot):
        rows = [dataclasses.asdict(r) for r in entry.requests]
        return {"type": "live", "time": entry.time, "requests": rows}
    return {"type": _NAMES[type(entry)], **dataclasses.asdict(entry)}


def decode(obj: dict[str, Any]) -> Record | LiveSnapshot:
    kind = obj.pop("type", None)
    if kind == "live":
        reqs = tuple(LiveRequest(**row) for row in obj["requests"])
        return LiveSnapshot(float(obj["time"]), reqs)
    cls = _TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown record type {kind!r}")
    if cls is StepRecord and "accepted_per_position" in obj:
        obj["accepted_per_position"] = tuple(obj["accepted_per_position"])
    return cls(**obj)


def read_recording(path: Path) -> Recording:
    """Parse a whole recording; a damaged line is an error naming it (a truncated last line, as
    left by a killed console, is skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RecordingError(f"no recording at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordingError(f"cannot read {path}: {exc}") from None
    if not lines:
        raise RecordingError(f"{path} is empty, not a recording")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("type") != "session":
        raise RecordingError(f"{path} is not an llmconsole recording (no session header)")
    if header.get("version") != FORMAT_VERSION:
        raise RecordingError(
            f"{path} has recording format {header.get('version')!r}; "
            f"this llmconsole reads version {FORMAT_VERSION}"
        )
    entries: list[Record | LiveSnapshot] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            entries.append(decode(json.loads(line)))
        except (json.JSONDecodeError, TypeError, ValueError, KeyError) as exc:
            if number == len(lines):
                break  # cut short while being written
            raise RecordingError(f"{path}:{number}: not a valid record ({exc})") from None
    entries.sort(key=lambda e: e.time)
    return Recording(
        path,
        dict(header.get("engine") or {}),
        str(header.get("api_url", "")),
        float(header.get("started", entries[0].time if entries else 0.0)),
        tuple(entries),
    )


class SessionRecorder:
    """Writes the session to JSONL from its own telemetry cursor, on its own thread: the engine
    never waits for the disk, and the console's refresh never waits for it either."""

    def __init__(
        self,
        path: Path,
        subscription: Subscription,
        live_requests: Callable[[], Iterable[LiveRequest]],
        engine_info: dict[str, Any],
        api_url: str,
        interval_s: float = 0.2,
    ) -> None:
        self.path = path
        self._sub = subscription
        self._live_requests = live_requests
        self._interval = interval_s
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.lines = 0
        header = {
            "type": "session",
            "version": FORMAT_VERSION,
            "started": time.time(),
            "engine": engine_info,
            "api_url": api_url,
        }
        self._write(header)
        self._last_live: tuple[LiveRequest, ...] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmconsole-recorder", daemon=True)

    def start(self) -> SessionRecorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._flush_once()
        self._file.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._flush_once()

    def _flush_once(self) -> None:
        if self._file.closed:
            return
        for record in self._sub.poll():
            self._write(encode(record))
        live = tuple(self._live_requests())
        if live != self._last_live:
            self._last_live = live
            self._write(encode(LiveSnapshot(time.time(), live)))
        self._file.flush()

    def _write(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.lines += 1
