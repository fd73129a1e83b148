"""KV-cache and queue gauges: how full the pool is and how much work is waiting."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget


def bar(fraction: float, width: int) -> str:
    fraction = max(0.0, min(1.0, fraction))
    full = round(fraction * width)
    return "█" * full + "░" * (width - full)


class Gauges(Widget):
    """Redrawn in place: a fixed-size widget that never asks the screen for a new layout (a
    Static.update() would, on every refresh)."""

    DEFAULT_CSS = """
    Gauges { height: 4; padding: 0 1; }
    """

    def show(
        self,
        kv_used: int,
        kv_total: int,
        running: int,
        max_running: int,
        queued: int,
        tokens_per_s: float,
        finished_ok: int,
        finished_failed: int,
    ) -> None:
        kv = kv_used / kv_total if kv_total else 0.0
        kv_style = "red" if kv > 0.9 else ("yellow" if kv > 0.7 else "green")
        rows = (
            ("KV cache ", kv, kv_style, f" {kv:4.0%} {kv_used}/{kv_total} pages"),
            (
                "running  ",
                running / max_running if max_running else 0.0,
                "cyan",
                f" {running}/{max_running} max",
            ),
            ("queue    ", queued / max(1, max_running), "yellow", f" {queued} waiting"),
        )
        values = (rows, tokens_per_s, finished_ok, finished_failed)
        if values != self._values:
            self._values = values
            self.refresh()

    _values: tuple = ((), 0.0, 0, 0)

    def render(self) -> Text:
        # Built here, not in show(): the bars' width depends on the size at paint time.
        rows, tokens_per_s, finished_ok, finished_failed = self._values
        text = Text(no_wrap=True, overflow="crop")
        if not rows:
            return text
        # The bar takes what the labels leave (the panel's padding is 1 cell a side).
        width = max(4, self.size.width - 2 - 9 - max(len(r[3]) for r in rows))
        for label, fraction, style, suffix in rows:
            text.append(label, style="bold")
            text.append(bar(fraction, width), style=style)
            text.append(suffix + "\n")
        text.append(f"output {tokens_per_s:8.1f} tok/s", style="bold green")
        text.append(f"   finished {finished_ok}", style="dim")
        if finished_failed:
            text.append(f"   failed/cancelled {finished_failed}", style="red")
        return text
