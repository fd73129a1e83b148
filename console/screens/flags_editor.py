"""`f`: edit the engine's flags and hot-restart it; every value is validated before anything
stops, and the change is shown (current -> new, and what it costs) for a confirmation first."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from llmconsole.core.config import ConfigError, flag_name
from llmconsole.core.restart import (
    GRAPH_FIELDS,
    LIVE_FIELDS,
    REBUILD_FIELDS,
    RestartPlan,
)

# The flags an operator changes mid-demo, in the order they are reached for.
EDITABLE = (
    "cuda_graph_max_bs",
    "disable_cuda_graph",
    "overlap_schedule",
    "max_running_requests",
    "chunked_prefill_size",
    "max_total_tokens",
    "mem_fraction_static",
    "page_size",
    "kv_cache_dtype",
    "context_length",
    "attention_backend",
    "speculative_algorithm",
    "speculative_draft_model_path",
    "speculative_num_steps",
    "speculative_eagle_topk",
    "speculative_num_draft_tokens",
    "model",
    "dtype",
)

COST = {
    "live": "applied between two steps, nothing rebuilt",
    "graphs": "CUDA graphs re-captured; requests keep their KV",
    "rebuild": "KV pool and graphs rebuilt; running requests are re-prefilled",
    "reload": "weights reloaded, then rebuilt; running requests are re-prefilled",
}

Validate = Callable[[dict[str, str]], RestartPlan]  # raises ConfigError


def field_cost(field: str) -> str:
    """The cheapest a change of `field` can be (max-running-requests past the slot table needs
    a rebuild; the plan says so on confirmation)."""
    if field in LIVE_FIELDS:
        return "live"
    if field in GRAPH_FIELDS:
        return "graphs"
    return "rebuild" if field in REBUILD_FIELDS else "reload"


def as_text(value: Any) -> str:
    """A config value as typed in the form; unset (auto) is empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def edited(current: Mapping[str, Any], texts: Mapping[str, str]) -> dict[str, str]:
    """The fields whose text differs from the current value's."""
    return {f: t.strip() for f, t in texts.items() if t.strip() != as_text(current.get(f))}


class FlagsEditor(ModalScreen[dict[str, str] | None]):
    """Dismisses with {field: text} once the operator confirmed a valid change, else None."""

    DEFAULT_CSS = """
    FlagsEditor { align: center middle; }
    FlagsEditor > Vertical {
        width: 100; height: 90%; border: thick $primary; background: $surface; padding: 0 1;
    }
    FlagsEditor VerticalScroll { height: 1fr; }
    FlagsEditor Grid {
        grid-size: 4; grid-columns: 34 14 22 1fr; grid-rows: 1; grid-gutter: 0 1; height: auto;
    }
    FlagsEditor Input { border: none; height: 1; padding: 0 1; background: $boost; }
    FlagsEditor Input:focus { background: $primary 30%; }
    FlagsEditor .head { text-style: bold; }
    FlagsEditor .cost { color: $text-muted; }
    FlagsEditor #error { color: $error; height: auto; }
    FlagsEditor #summary { color: $warning; height: auto; }
    FlagsEditor Horizontal { height: auto; align-horizontal: right; }
    """
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(
        self, current: Mapping[str, Any], validate: Validate, focus_field: str | None = None
    ) -> None:
        super().__init__()
        self._current = dict(current)
        self._validate = validate
        self._focus_field = focus_field if focus_field in EDITABLE else EDITABLE[0]
        self._confirming: dict[str, str] | None = None

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(
                "[b]Engine flags[/b]: edit, Apply to check, Confirm to restart "
                "(empty = auto). Requests keep streaming.\n"
            )
            with VerticalScroll(), Grid():
                for head in ("flag", "current", "new", "cost"):
                    yield Label(head, classes="head")
                for field in EDITABLE:
                    current = as_text(self._current.get(field))
                    yield Label(flag_name(field))
                    yield Label(current or "auto", id=f"current-{field}")
                    yield Input(current, id=f"new-{field}", placeholder="auto")
                    yield Label(field_cost(field), classes="cost")
            yield Static(id="error")
            yield Static(id="summary")
            with Horizontal():
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Revert", id="revert")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one(f"#new-{self._focus_field}", Input).focus()

    def texts(self) -> dict[str, str]:
        return {f: self.query_one(f"#new-{f}", Input).value for f in EDITABLE}

    def set_text(self, field: str, text: str) -> None:
        self.query_one(f"#new-{field}", Input).value = text

    def on_input_changed(self, event: Input.Changed) -> None:
        self._unconfirm()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
        elif event.button.id == "revert":
            self.revert()
        else:
            self.apply()

    def revert(self) -> None:
        for field in EDITABLE:
            self.set_text(field, as_text(self._current.get(field)))
        self._unconfirm()
        self.query_one("#error", Static).update("")

    def apply(self) -> None:
        """First press validates and shows the plan; the second (Confirm) dismisses."""
        changes = edited(self._current, self.texts())
        if self._confirming is not None and changes == self._confirming:
            self.dismiss(changes)
            return
        error = self.query_one("#error", Static)
        if not changes:
            error.update("nothing changed")
            return
        try:
            plan = self._validate(changes)
        except ConfigError as exc:
            error.update(str(exc))
            return
        error.update("")
        if plan.mode == "none":
            error.update("nothing changed (the values resolve to the current ones)")
            return
        self._confirming = changes
        cost = COST[plan.mode]
        if plan.mode == "rebuild" and plan.keeps_kv:
            cost = "backend, slot table and graphs rebuilt; requests keep their KV"
        self.query_one("#summary", Static).update(
            f"{plan.describe()}\n{plan.mode}: {cost}. Press Confirm to apply."
        )
        self.query_one("#apply", Button).label = "Confirm"

    def _unconfirm(self) -> None:
        if self._confirming is None:
            return
        self._confirming = None
        self.query_one("#summary", Static).update("")
        self.query_one("#apply", Button).label = "Apply"

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
