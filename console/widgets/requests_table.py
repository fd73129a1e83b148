"""Running requests: one row per unfinished request, updated in place (no flicker, no resort)."""

from __future__ import annotations

from collections.abc import Sequence

from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable

from llmconsole.core.telemetry import LiveRequest

# (header, width): a row is one pre-formatted cell. DataTable re-renders every cell of every
# visible row whenever any cell changes; one cell per row makes a repaint ~9x cheaper, which
# matters when the console shares two CPU cores with the engine.
COLUMNS = (
    ("id", 8),
    ("state", 7),
    ("prompt", 6),
    ("cached", 6),
    ("gen", 5),
    ("tok/s", 6),
    ("TTFT", 7),
    ("age", 7),
    ("accepted", 8),
)


def format_row(cells: tuple[str, ...]) -> str:
    first, *rest = cells
    parts = [first[: COLUMNS[0][1]].ljust(COLUMNS[0][1])]
    parts += [c.rjust(w) for c, (_, w) in zip(rest, COLUMNS[1:], strict=True)]
    return " ".join(parts)


HEADER = format_row(tuple(name for name, _ in COLUMNS))


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
        self.add_column(HEADER, key="request", width=len(HEADER))
        self._cells: dict[str, tuple[str, ...]] = {}

    def rids(self) -> list[str]:
        """Request ids in display order."""
        return [self.coordinate_to_cell_key((i, 0))[0].value or "" for i in range(self.row_count)]

    def cells(self, rid: str) -> tuple[str, ...]:
        """What the row of `rid` shows, column by column."""
        return self._cells[rid]

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
                self.add_row(format_row(cells), key=rid)
            elif cells != old:
                self.update_cell(rid, "request", format_row(cells))
            self._cells[rid] = cells

    def action_open_request(self) -> None:
        if (rid := self.selected_rid) is not None:
            self.post_message(self.Open(rid))

    def action_cancel_request(self) -> None:
        if (rid := self.selected_rid) is not None:
            self.post_message(self.Cancel(rid))
