"""Running requests: one row per unfinished request, updated in place (no flicker, no resort)."""

from __future__ import annotations

from collections.abc import Sequence

from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from llmconsole.core.telemetry import LiveRequest

COLUMNS = (
    ("id", "id"),
    ("state", "state"),
    ("prompt", "prompt"),
    ("cached", "cached"),
    ("gen", "generated"),
    ("tok/s", "tok_s"),
    ("TTFT", "ttft"),
    ("age", "age"),
    ("accepted", "accepted"),
)


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def row_cells(req: LiveRequest, now: float) -> tuple[str, ...]:
    tok_s = req.tokens_per_s(now)
    return (
        req.rid,
        req.state,
        str(req.prompt_tokens),
        str(req.cached_tokens),
        str(req.generated_tokens),
        "—" if tok_s is None else f"{tok_s:.1f}",
        _seconds(req.ttft_s()),
        _seconds(req.age_s(now)),
        str(req.accepted_draft_tokens),
    )


class RequestsTable(DataTable[str]):
    """Enter opens the request, x cancels it (both handled by the app, which owns the engine)."""

    BINDINGS = [
        Binding("enter", "open_request", "Open request"),
        Binding("x", "cancel_request", "Cancel request"),
    ]

    class Open(Message):
        def __init__(self, rid: str) -> None:
            super().__init__()
            self.rid = rid

    class Cancel(Message):
        def __init__(self, rid: str) -> None:
            super().__init__()
            self.rid = rid

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for label, key in COLUMNS:
            self.add_column(label, key=key)
        self._cells: dict[str, tuple[str, ...]] = {}

    @property
    def selected_rid(self) -> str | None:
        if not self.row_count:
            return None
        row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        return row_key.value

    def show(self, requests: Sequence[LiveRequest], now: float) -> None:
        wanted = {r.rid: row_cells(r, now) for r in requests}
        for rid in [rid for rid in self._cells if rid not in wanted]:
            self.remove_row(rid)
            del self._cells[rid]
        for rid, cells in wanted.items():
            old = self._cells.get(rid)
            if old is None:
                self.add_row(*cells, key=rid)
            else:
                for (_, key), new, was in zip(COLUMNS, cells, old, strict=True):
                    if new != was:
                        self.update_cell(rid, key, new)
            self._cells[rid] = cells

    def action_open_request(self) -> None:
        if (rid := self.selected_rid) is not None:
            self.post_message(self.Open(rid))

    def action_cancel_request(self) -> None:
        if (rid := self.selected_rid) is not None:
            self.post_message(self.Cancel(rid))
