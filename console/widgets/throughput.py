"""Throughput over time: output tok/s (left axis), running batch and queue (right axis)."""

from __future__ import annotations

from collections.abc import Sequence

from textual_plotext import PlotextPlot


class ThroughputChart(PlotextPlot):
    """Redrawn at most once a second (the data is per second; plotext is not free)."""

    DEFAULT_CSS = """
    ThroughputChart { height: 1fr; min-height: 8; }
    """

    def show(
        self,
        xs: Sequence[float],
        tokens_per_s: Sequence[float],
        running: Sequence[float],
        queue: Sequence[float],
    ) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("output tok/s (left) · running, queue (right) · last 2 min")
        plt.xlabel("seconds ago")
        if xs:
            for label, ys, color, side in (
                ("tok/s", tokens_per_s, "green", "left"),
                ("running", running, "cyan", "right"),
                ("queue", queue, "orange", "right"),
            ):
                plt.plot(list(xs), list(ys), label=label, color=color, yside=side, marker="braille")
            plt.xlim(min(xs[0], -10.0), 0.0)
        else:
            plt.xlim(-60.0, 0.0)
            plt.ylim(0.0, 1.0)
        self.refresh()
