"""`l`: settings for the built-in load, validated before anything is sent."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from ..load_runner import LoadSettings


def parse_settings(concurrency: str, requests: str, max_tokens: str, dataset: str) -> LoadSettings:
    """Raises ValueError with a message for the user."""
    values: dict[str, int] = {}
    for name, raw in (
        ("concurrency", concurrency),
        ("number of requests", requests),
        ("max tokens", max_tokens),
    ):
        try:
            values[name] = int(raw.strip())
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    path = dataset.strip() or None
    if path is not None and not Path(path).expanduser().is_file():
        raise ValueError(f"no ShareGPT file at {path}")
    return LoadSettings(
        concurrency=values["concurrency"],
        num_requests=values["number of requests"],
        max_tokens=values["max tokens"],
        dataset_path=str(Path(path).expanduser()) if path else None,
    )


class LoadDialog(ModalScreen[LoadSettings | None]):
    DEFAULT_CSS = """
    LoadDialog { align: center middle; }
    LoadDialog > Vertical {
        width: 70; height: auto; border: thick $primary; background: $surface; padding: 1 2;
    }
    LoadDialog Grid { grid-size: 2; grid-columns: 22 1fr; grid-rows: 3; height: auto; }
    LoadDialog Label { padding: 1 0; }
    LoadDialog #error { color: $error; height: auto; }
    LoadDialog Horizontal { height: auto; align-horizontal: right; }
    """
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, initial: LoadSettings) -> None:
        super().__init__()
        self._initial = initial

    def compose(self) -> ComposeResult:
        s = self._initial
        with Vertical():
            yield Static("[b]Built-in load[/b]: streaming requests through the OpenAI API\n")
            with Grid():
                yield Label("concurrency")
                yield Input(str(s.concurrency), id="concurrency", type="integer")
                yield Label("number of requests")
                yield Input(str(s.num_requests), id="requests", type="integer")
                yield Label("max tokens")
                yield Input(str(s.max_tokens), id="max_tokens", type="integer")
                yield Label("ShareGPT file")
                yield Input(
                    s.dataset_path or "", id="dataset", placeholder="(empty: built-in prompts)"
                )
            yield Static(id="error")
            with Horizontal():
                yield Button("Start", variant="primary", id="start")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        self.submit()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.submit()

    def submit(self) -> None:
        try:
            settings = parse_settings(
                self.query_one("#concurrency", Input).value,
                self.query_one("#requests", Input).value,
                self.query_one("#max_tokens", Input).value,
                self.query_one("#dataset", Input).value,
            )
        except ValueError as exc:
            self.query_one("#error", Static).update(str(exc))
            return
        self.dismiss(settings)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
