"""Enter on a request: its prompt and the text generated so far, refreshed while it runs."""

from __future__ import annotations

from collections.abc import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from llmconsole.core.engine import RequestDetail


class RequestScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    RequestScreen { align: center middle; }
    RequestScreen > VerticalScroll {
        width: 90%; height: 80%; border: thick $primary; background: $surface; padding: 0 1;
    }
    RequestScreen .title { text-style: bold; color: $primary; }
    RequestScreen #output { color: $success; }
    """
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("enter", "dismiss", "Close"),
        Binding("x", "cancel", "Cancel request"),
    ]

    def __init__(
        self,
        rid: str,
        fetch: Callable[[str], RequestDetail | None],
        cancel: Callable[[str], None] | None,
    ) -> None:
        super().__init__()
        self.rid = rid
        self._fetch = fetch
        self._cancel = cancel
        self._finished = False

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(id="meta", classes="title")
            yield Static("prompt", classes="title")
            yield Static(id="prompt", markup=False)
            yield Static("output so far", classes="title")
            yield Static(id="output", markup=False)

    def on_mount(self) -> None:
        self.refresh_detail()
        self.set_interval(0.25, self.refresh_detail)

    def refresh_detail(self) -> None:
        if self._finished:
            return
        detail = self._fetch(self.rid)
        meta = self.query_one("#meta", Static)
        if detail is None:
            self._finished = True
            meta.update(f"{self.rid}: finished (or not available in a replay)")
            return
        meta.update(
            f"{detail.rid}   prompt {detail.prompt_tokens} tokens   generated "
            f"{detail.generated_tokens}/{detail.max_new_tokens}   temperature "
            f"{detail.params.temperature}"
        )
        self.query_one("#prompt", Static).update(detail.prompt)
        self.query_one("#output", Static).update(detail.output or "…")

    def action_cancel(self) -> None:
        if self._cancel is not None:
            self._cancel(self.rid)
        self.dismiss()
