"""Step strip: one cell per engine step, newest on the right.

The colour says how the step ran (CUDA graph, eager decode, prefill, speculative verify), the
height of the bar says its batch size relative to the largest in view; the first step after a
hot restart is marked. Hovering a cell, or moving
the selection with ←/→ when the strip has focus, shows that step's details on the second line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.events import Leave, MouseMove
from textual.widget import Widget

from llmconsole.core.telemetry import StepRecord

from .gauges import byte_rate

BARS = "▁▂▃▄▅▆▇█"


def step_class(step: StepRecord) -> str:
    if step.kind == "verify":
        return "verify"
    if step.kind != "decode":
        return "prefill"
    return "graph" if step.cuda_graph else "eager"


def bar_for(batch_size: int, largest: int) -> str:
    level = round((len(BARS) - 1) * batch_size / largest) if largest else 0
    return BARS[max(0, min(len(BARS) - 1, level))]


def describe_step(step: StepRecord) -> str:
    """One line, short enough for the strip at 120 columns: the batch's padding only where a
    graph padded it, the token count only where it differs from the batch (prefill, verify)."""
    mode = "CUDA graph" if step.cuda_graph else "eager"
    padded = step.cuda_graph and step.padded_bs != step.batch_size
    duration = f"{step.duration_s * 1000:.1f} ms"
    if step.bytes_read and step.duration_s > 0:  # weights + attended KV over the step's time
        duration += f" · reads {byte_rate(step.bytes_read / step.duration_s)}"
    parts = [
        f"step {step.step_id}",
        f"{step.kind} · {mode}",
        f"batch {step.batch_size}" + (f" padded to {step.padded_bs}" if padded else ""),
    ]
    if step.num_tokens != step.batch_size:
        parts.append(f"{step.num_tokens} tokens")
    parts += [duration, f"queue {step.queue_len}"]
    if step.cached_tokens:  # prompt tokens its new requests read from the prefix cache
        parts.append(f"cached {step.cached_tokens}")
    if step.drafted_tokens:
        parts.append(f"accepted {step.accepted_tokens}/{step.drafted_tokens}")
    if step.retracted:
        parts.append(f"retracted {step.retracted}")
    return "  ".join(parts)


class StepStrip(Widget, can_focus=True):
    DEFAULT_CSS = """
    StepStrip { height: 3; border-title-color: $text-muted; }
    StepStrip > .stepstrip--graph { color: $success; }
    StepStrip > .stepstrip--eager { color: $warning; }
    StepStrip > .stepstrip--prefill { color: $accent; }
    StepStrip > .stepstrip--verify { color: $secondary; }
    StepStrip > .stepstrip--restart { color: $error; text-style: reverse; }
    StepStrip > .stepstrip--selected { background: $foreground 30%; }
    StepStrip > .stepstrip--legend { color: $text-muted; }
    """
    COMPONENT_CLASSES = {
        "stepstrip--graph",
        "stepstrip--eager",
        "stepstrip--prefill",
        "stepstrip--verify",
        "stepstrip--restart",
        "stepstrip--selected",
        "stepstrip--legend",
    }
    BINDINGS = [
        Binding("left", "move(-1)", "Older step", show=False),
        Binding("right", "move(1)", "Newer step", show=False),
        Binding("end", "follow", "Newest step", show=False),
    ]

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._steps: list[StepRecord] = []
        self._selected: int | None = None  # step_id pinned by the keyboard
        self._hover: int | None = None  # step_id under the mouse
        self._restarts: Mapping[int, str] = {}

    def show(self, steps: Sequence[StepRecord], restarts: Mapping[int, str] | None = None) -> None:
        """`restarts`: step_id of the first step after each hot restart -> what changed."""
        self._steps = list(steps)
        self._restarts = restarts or {}
        self.refresh()

    def visible_steps(self) -> list[StepRecord]:
        width = max(1, self.size.width)
        return self._steps[-width:]

    def _focused_step(self) -> StepRecord | None:
        wanted = self._hover if self._hover is not None else self._selected
        for step in reversed(self._steps):
            if wanted is None or step.step_id == wanted:
                return step
        return self._steps[-1] if self._steps else None

    def render(self) -> Text:
        steps = self.visible_steps()
        largest = max((s.batch_size for s in steps), default=0)
        focused = self._focused_step()
        # Component styles are resolved through CSS: once per render, not once per cell.
        styles = {
            name: self.get_component_rich_style(f"stepstrip--{name}")
            for name in ("graph", "eager", "prefill", "verify", "restart", "selected", "legend")
        }
        pinned = self._hover is not None or self._selected is not None
        marked = focused.step_id if focused is not None and pinned else None
        text = Text(no_wrap=True, overflow="crop")
        text.append(" " * (self.size.width - len(steps)))
        # One segment per run of same-styled cells: painting cost grows with segments.
        run: list[str] = []
        run_style: Style | None = None
        for step in steps:
            style = styles["restart" if step.step_id in self._restarts else step_class(step)]
            if step.step_id == marked:
                style += styles["selected"]
            if style != run_style and run:
                text.append("".join(run), style=run_style)
                run = []
            run_style = style
            run.append(bar_for(step.batch_size, largest))
        if run:
            text.append("".join(run), style=run_style)
        text.append("\n")
        line = describe_step(focused) if focused else "no steps yet"
        if focused is not None and focused.step_id in self._restarts:
            line += f"  first step after {self._restarts[focused.step_id]}"
        text.append(line, style=Style(bold=True))
        text.append("\n")
        for name, label in (
            ("graph", "CUDA graph"),
            ("eager", "eager"),
            ("prefill", "prefill"),
            ("verify", "verify"),
            ("restart", "restart"),
        ):
            text.append("█ ", style=styles[name])
            text.append(f"{label}  ", style=styles["legend"])
        text.append("↕ batch", style=styles["legend"])
        return text

    def _step_at(self, x: int) -> StepRecord | None:
        steps = self.visible_steps()
        index = x - (self.size.width - len(steps))
        return steps[index] if 0 <= index < len(steps) else None

    def on_mouse_move(self, event: MouseMove) -> None:
        step = self._step_at(event.x) if event.y == 0 else None
        self._hover = None if step is None else step.step_id
        self.refresh()

    def on_leave(self, event: Leave) -> None:
        self._hover = None
        self.refresh()

    def action_move(self, delta: int) -> None:
        steps = self.visible_steps()
        if not steps:
            return
        ids = [s.step_id for s in steps]
        current = ids.index(self._selected) if self._selected in ids else len(ids) - 1
        self._selected = ids[max(0, min(len(ids) - 1, current + delta))]
        self.refresh()

    def action_follow(self) -> None:
        self._selected = None
        self.refresh()
