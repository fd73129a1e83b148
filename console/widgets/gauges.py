"""KV-cache and queue gauges: how full the pool is, how much of it the prefix cache holds, how
often admitted requests find their prefix there, how much work is waiting, and how fast decode
steps read memory against the device's copy rate (decode is memory-bound: that is its floor)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

SPARKS = "▁▂▃▄▅▆▇█"
CACHED_STYLE = "magenta"
HIT_WINDOW_S = 10  # the hit rate's number covers this many seconds; the sparkline, its width
LABEL_WIDTH = 9


@dataclass(frozen=True)
class GaugeValues:
    kv_used: int  # pages running requests hold
    kv_cached: int  # pages only the prefix cache holds: reclaimable, so not "used"
    kv_total: int
    running: int
    max_running: int
    queued: int
    tokens_per_s: float
    finished_ok: int
    finished_failed: int
    prefix_cache: bool  # whether the engine runs one (off: the row says so)
    hit_rate: float | None = None  # over the last HIT_WINDOW_S seconds; None: nothing admitted
    hit_history: tuple[float | None, ...] = ()  # one a second, oldest first, None: no admission
    read_rate: float | None = None  # bytes/s decode steps read lately; None: see read_note
    read_note: str = "no decode step lately"  # why there is no rate
    copy_rate: float | None = None  # bytes/s the device copies (read + write); None: unknown


def bar(fraction: float, width: int) -> str:
    fraction = max(0.0, min(1.0, fraction))
    full = round(fraction * width)
    return "█" * full + "░" * (width - full)


def stacked_cells(fractions: Sequence[float], width: int) -> list[int]:
    """Cells for each fraction laid end to end: rounded cumulatively, so they never add up to
    more than `width` and a part's share does not depend on the parts after it."""
    cells: list[int] = []
    total = 0.0
    filled = 0
    for fraction in fractions:
        total = min(1.0, total + max(0.0, fraction))
        end = round(total * width)
        cells.append(end - filled)
        filled = end
    return cells


def percent(fraction: float) -> str:
    """'12%'; '<1%' for a share that is there but would round to '0%'."""
    return "<1%" if 0.0 < fraction < 0.005 else f"{fraction:.0%}"


def byte_rate(rate: float) -> str:
    """'2.61 TB/s', '19.4 GB/s', '512 MB/s': three significant figures or so."""
    for unit, scale in (("TB/s", 1e12), ("GB/s", 1e9)):
        if rate >= scale:
            value = rate / scale
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{rate / 1e6:.0f} MB/s"


def sparkline(rates: Sequence[float | None], width: int) -> Text:
    """The last `width` rates, newest on the right; a dim dot for a second without a rate."""
    text = Text(" " * max(0, width - len(rates)))
    for rate in rates[-width:] if width > 0 else ():
        if rate is None:
            text.append("·", style="dim")
        else:
            level = round(max(0.0, min(1.0, rate)) * (len(SPARKS) - 1))
            text.append(SPARKS[level], style=CACHED_STYLE)
    return text


class Gauges(Widget):
    """Redrawn in place: a fixed-size widget that never asks the screen for a new layout (a
    Static.update() would, on every refresh)."""

    DEFAULT_CSS = """
    Gauges { height: 6; padding: 0 1; }
    """

    _values: GaugeValues | None = None

    def show(self, values: GaugeValues) -> None:
        if values != self._values:
            self._values = values
            # With the prefix cache the KV row gives shares; the pages go in the bottom border,
            # where they cost the bars no width.
            pages = f"{values.kv_used} used + {values.kv_cached} cached / {values.kv_total} pages"
            self.border_subtitle = pages if values.prefix_cache else ""
            self.refresh()

    def render(self) -> Text:
        # Built here, not in show(): the bars' width depends on the size at paint time.
        text = Text(no_wrap=True, overflow="crop")
        v = self._values
        if v is None:
            return text
        kv = v.kv_used / v.kv_total if v.kv_total else 0.0
        cached = v.kv_cached / v.kv_total if v.kv_total else 0.0
        kv_style = "red" if kv > 0.9 else ("yellow" if kv > 0.7 else "green")
        if v.prefix_cache:
            kv_suffix = f" {percent(kv):>4} +{percent(cached)} cached"
            hit = "—" if v.hit_rate is None else percent(v.hit_rate)
            hit_suffix = f" hit {hit} ({HIT_WINDOW_S} s)"
        else:
            kv_suffix = f" {kv:4.0%} {v.kv_used}/{v.kv_total} pages"
            hit_suffix = ""
        running = v.running / v.max_running if v.max_running else 0.0
        running_suffix = f" {v.running}/{v.max_running} max"
        queue_suffix = f" {v.queued} waiting"
        read = None if v.read_rate is None or not v.copy_rate else v.read_rate / v.copy_rate
        read_suffix = "" if v.read_rate is None else f" {byte_rate(v.read_rate)}"
        if read is not None:
            read_suffix += f" {percent(read)}"
        suffixes = (kv_suffix, hit_suffix, running_suffix, queue_suffix, read_suffix)
        # The bars take what the labels leave (the panel's padding is 1 cell a side).
        width = max(4, self.size.width - 2 - LABEL_WIDTH - max(map(len, suffixes)))

        used_cells, cached_cells = stacked_cells((kv, cached), width)
        text.append("KV cache ", style="bold")
        text.append("█" * used_cells, style=kv_style)
        text.append("▒" * cached_cells, style=CACHED_STYLE)
        text.append("░" * (width - used_cells - cached_cells), style=kv_style)
        text.append(kv_suffix + "\n")
        text.append("prefix   ", style="bold")
        if v.prefix_cache:
            text.append_text(sparkline(v.hit_history, width))
            text.append(hit_suffix + "\n")
        else:
            text.append("cache off\n", style="dim")
        for label, fraction, style, suffix in (
            ("running  ", running, "cyan", running_suffix),
            ("queue    ", v.queued / max(1, v.max_running), "yellow", queue_suffix),
        ):
            text.append(label, style="bold")
            text.append(bar(fraction, width), style=style)
            text.append(suffix + "\n")
        text.append("mem read ", style="bold")
        if v.read_rate is None:
            text.append(v.read_note + "\n", style="dim")
        else:  # without a copy rate (an old recording) the bar stays empty; the rate still shows
            text.append(bar(read or 0.0, width), style="blue")
            text.append(read_suffix + "\n")
        text.append(f"output {v.tokens_per_s:8.1f} tok/s", style="bold green")
        text.append(f"   finished {v.finished_ok}", style="dim")
        if v.finished_failed:
            text.append(f"   failed/cancelled {v.finished_failed}", style="red")
        return text
