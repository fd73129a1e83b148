"""When the console may read and repaint: a CPU budget for the UI thread, not a fixed rate.

A repaint's cost is mostly Textual's compositor, and it varies: a few table rows cost ~8 ms on a
small CPU, a chart frame ~25 ms, a layout change more. A fixed rate either wastes the engine's
CPU on a small machine or looks sluggish on a big one. The pacer keeps the UI thread's average
CPU share at or under `share` of one core: after a paint that cost c seconds of the thread's CPU
time, the next one waits until c / share seconds have passed, within [min_interval,
max_interval] so the screen never stalls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PaintBudget:
    share: float  # of one core, averaged from one paint to the next
    min_interval: float  # seconds: the fastest the panels repaint
    max_interval: float  # seconds: the slowest, whatever a paint cost
    chart_interval: float  # seconds between chart redraws (the costliest panel)

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")


# Under 4 cores the engine's own threads (the loop and torch's workers) fill the machine, so
# every millisecond the UI takes comes out of theirs: 1% of a core (a plain repaint about once a
# second). With cores to spare the limit is the GIL the UI shares with the engine: 3%.
SMALL_MACHINE_BUDGET = PaintBudget(
    share=0.01, min_interval=0.5, max_interval=2.0, chart_interval=4.0
)
BUDGET = PaintBudget(share=0.03, min_interval=0.1, max_interval=2.0, chart_interval=2.0)


def budget_for(cpu_count: int | None) -> PaintBudget:
    return SMALL_MACHINE_BUDGET if (cpu_count or 1) < 4 else BUDGET


def paint_due(budget: PaintBudget, elapsed: float, cpu_used: float) -> bool:
    """elapsed: wall seconds since the last paint began; cpu_used: the UI thread's CPU seconds
    in that time (the paint, the compositor pass after it, key handling, idle ticks)."""
    if elapsed < budget.min_interval:
        return False
    return elapsed >= budget.max_interval or cpu_used <= budget.share * elapsed


class PaintPacer:
    """Asked on every timer tick; `painted()` marks the start of a paint."""

    def __init__(
        self,
        budget: PaintBudget,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.budget = budget
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._painted_at = float("-inf")  # the first tick paints
        self._cpu_at = 0.0
        self._chart_at = float("-inf")

    def due(self) -> bool:
        elapsed = self._clock() - self._painted_at
        return paint_due(self.budget, elapsed, self._cpu_clock() - self._cpu_at)

    def forgive(self) -> None:
        """Leave the UI thread's CPU time so far out of the budget: for one-off work (freezing
        the heap after startup) that must not hold back the next repaints."""
        self._cpu_at = self._cpu_clock()

    def painted(self) -> bool:
        """Record a paint starting now; True when the chart should be redrawn with it."""
        now = self._clock()
        self._painted_at, self._cpu_at = now, self._cpu_clock()
        if now - self._chart_at >= self.budget.chart_interval:
            self._chart_at = now
            return True
        return False
