"""Where the console's data comes from: a running engine, or a recording played back.

Both give the same four things (the engine description, new telemetry records, the unfinished
requests, and "now" on their clock), so every panel is drawn by the same code in both modes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from llmconsole.core.engine import Engine, RequestDetail
from llmconsole.core.telemetry import LiveRequest, Record

from .recording import LiveSnapshot, Recording


class TelemetrySource(Protocol):
    """Contract: `poll()` returns each record exactly once, in order; `live_requests()` and
    `now()` may be called any number of times; neither ever blocks on the engine."""

    is_live: bool  # False for a replay: no cancelling, no load, no export of a live engine
    api_url: str

    def describe(self) -> dict[str, Any]: ...

    def poll(self) -> list[Record]: ...

    def live_requests(self) -> tuple[LiveRequest, ...]: ...

    def now(self) -> float: ...

    def request_detail(self, rid: str) -> RequestDetail | None: ...


class EngineSource:
    is_live = True

    def __init__(self, engine: Engine, api_url: str) -> None:
        self.engine = engine
        self.api_url = api_url
        self._sub = engine.subscribe()
        self._describe = engine.describe()

    def describe(self) -> dict[str, Any]:
        return self._describe

    def poll(self) -> list[Record]:
        return self._sub.poll()

    def live_requests(self) -> tuple[LiveRequest, ...]:
        return self.engine.live_requests()

    def now(self) -> float:
        return time.time()

    def request_detail(self, rid: str) -> RequestDetail | None:
        return self.engine.request_detail(rid)


class ReplaySource:
    """Plays a recording on its own clock: `speed` x real time, pausable, seekable."""

    is_live = False

    def __init__(
        self, recording: Recording, speed: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not speed > 0:
            raise ValueError(f"replay speed must be > 0, got {speed}")
        self.recording = recording
        self.api_url = recording.api_url
        self._clock = clock
        self._speed = speed
        self._paused = False
        self._entries = recording.entries
        self._next = 0  # index of the first entry not yet emitted
        self._live: tuple[LiveRequest, ...] = ()
        self._origin_wall = clock()
        self._origin_time = recording.started

    # ---- playback controls -------------------------------------------------------------------

    @property
    def speed(self) -> float:
        return self._speed

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def finished(self) -> bool:
        return self._next >= len(self._entries)

    def set_speed(self, speed: float) -> None:
        if not speed > 0:
            raise ValueError(f"replay speed must be > 0, got {speed}")
        self._rebase()
        self._speed = speed

    def toggle_pause(self) -> None:
        self._rebase()
        self._paused = not self._paused

    def seek(self, position_s: float) -> None:
        """Pause at `position_s` seconds into the recording (forward only: records already
        shown stay shown). Snapshots use this for a deterministic screen."""
        self._origin_time = min(self.recording.started + position_s, self.recording.end)
        self._origin_wall = self._clock()
        self._paused = True

    def seek_end(self) -> None:
        self.seek(self.recording.end - self.recording.started)

    def _rebase(self) -> None:
        self._origin_time = self.now()
        self._origin_wall = self._clock()

    # ---- TelemetrySource ---------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return self.recording.engine

    def now(self) -> float:
        if self._paused:
            return self._origin_time
        elapsed = (self._clock() - self._origin_wall) * self._speed
        return min(self._origin_time + elapsed, self.recording.end)

    def poll(self) -> list[Record]:
        now = self.now()
        out: list[Record] = []
        while self._next < len(self._entries) and self._entries[self._next].time <= now:
            entry = self._entries[self._next]
            if isinstance(entry, LiveSnapshot):
                self._live = entry.requests
            else:
                out.append(entry)
            self._next += 1
        return out

    def live_requests(self) -> tuple[LiveRequest, ...]:
        return self._live

    def request_detail(self, rid: str) -> RequestDetail | None:
        return None  # recordings keep counts, not text
