"""Speculative decoding: algorithm, accept length, accept rate, acceptance per draft position.
Dimmed while speculation is off."""

from __future__ import annotations

from rich.text import Text

from ..state import SpecStats
from .text_panel import TextPanel


def spec_text(algorithm: str, stats: SpecStats) -> Text:
    text = Text(no_wrap=True, overflow="crop")
    text.append("speculative ", style="bold")
    if algorithm in ("", "none", None):
        text.append("off  (--speculative-algorithm)")
        return text
    text.append(algorithm)
    length, rate = stats.accept_length, stats.accept_rate
    text.append("   accept length ")
    text.append("—" if length is None else f"{length:.2f}", style="bold")
    text.append("   accept rate ")
    text.append("—" if rate is None else f"{rate:.0%}", style="bold")
    text.append(f"   verify steps {stats.verify_steps}\n")
    rates = stats.position_rates()
    text.append("per position ")
    if not rates:
        text.append("—")
    for k, r in enumerate(rates):
        text.append(f" {k + 1}:{r:.0%}")
    return text


class SpecPanel(TextPanel):
    DEFAULT_CSS = """
    SpecPanel { height: 2; padding: 0 1; }
    SpecPanel.-off { color: $text-disabled; }
    """

    def show(self, algorithm: str, stats: SpecStats) -> None:
        self.set_class(algorithm in ("", "none", None), "-off")
        text = spec_text(algorithm, stats)
        self.set_text(text)
