"""Speculative decoding: algorithm, accept length, accept rate, acceptance per draft position.
Dimmed while speculation is off."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from ..state import SpecStats
from .text_panel import TextPanel


def spec_shape(config: dict[str, Any]) -> str:
    """What each verify pass checks, from the engine's resolved flags: 'chain of 3 drafts', or
    'tree 5 steps x topk 4, 8 tokens' (tree drafting)."""
    steps = config.get("speculative_num_steps")
    topk = config.get("speculative_eagle_topk") or 1
    tokens = config.get("speculative_num_draft_tokens")
    if not tokens:
        return ""
    if topk > 1:
        return f"tree {steps} steps x topk {topk}, {tokens} tokens"
    return f"chain of {tokens - 1} drafts"


def spec_text(algorithm: str, stats: SpecStats, shape: str = "") -> Text:
    text = Text(no_wrap=True, overflow="crop")
    text.append("speculative ", style="bold")
    if algorithm in ("", "none", None):
        text.append("off  (--speculative-algorithm)")
        return text
    text.append(algorithm)
    if shape:
        text.append(f" ({shape})")
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

    def show(self, algorithm: str, stats: SpecStats, shape: str = "") -> None:
        self.set_class(algorithm in ("", "none", None), "-off")
        text = spec_text(algorithm, stats, shape)
        self.set_text(text)
