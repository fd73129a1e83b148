"""Running requests: one row per unfinished request, updated in place (no flicker, no resort).

A line-API widget rather than a DataTable: DataTable re-renders every visible row whenever any
cell changes, and its row add/remove costs a layout; here each row is one pre-formatted string
whose `Strip` is built once per change of text or style and cached, `show()` repaints only the
lines that changed, and the virtual size (so the layout) changes only with the row count. That
matters when the console shares two CPU cores with the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from llmconsole.core.telemetry import LiveRequest

# (header, width) of each column; a row is one string of fixed-width columns.
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
PADDING = 1  # cells left and right of every line, as DataTable's cell padding
LINE_WIDTH = len(HEADER) + 2 * PADDING


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


def _padded(text: str) -> str:
    return f"{' ' * PADDING}{text}{' ' * PADDING}"


class RequestsTable(ScrollView, can_focus=True):
    """Enter opens the request, x cancels it (both handled by the app, which owns the engine).

    Line 0 is the header, fixed while the rows scroll under it; row i is virtual line i + 1.
    The cursor is a row index; `show()` keeps it on the same request while that request lives
    (rows above it may vanish), and at the same index, clamped, when its own row vanishes.
    """

    DEFAULT_CSS = """
    RequestsTable {
        background: $surface;
        color: $foreground;
        height: auto;
        max-height: 100%;
        &:focus {
            background-tint: $foreground 5%;
            & > .requests-table--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .requests-table--header {
                background-tint: $foreground 5%;
            }
        }
        & > .requests-table--header {
            text-style: bold;
            background: $panel;
            color: $foreground;
        }
        &:ansi > .requests-table--header {
            background: ansi_bright_blue;
            color: ansi_default;
        }
        & > .requests-table--even-row {
            background: $surface-lighten-1 50%;
        }
        &:dark > .requests-table--even-row {
            background: $surface-darken-1 40%;
        }
        & > .requests-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
    }
    """
    COMPONENT_CLASSES = {
        "requests-table--header",
        "requests-table--even-row",
        "requests-table--odd-row",
        "requests-table--cursor",
    }
    BINDINGS = [
        Binding("enter", "open_request", "Open request"),
        Binding("x", "cancel_request", "Cancel request"),
        Binding("up", "move_cursor(-1)", "Previous request", show=False),
        Binding("down", "move_cursor(1)", "Next request", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "first", "First request", show=False),
        Binding("end", "last", "Last request", show=False),
    ]

    class Open(Message):
        def __init__(self, rid: str) -> None:
            super().__init__()
            self.rid = rid

    class Cancel(Message):
        def __init__(self, rid: str) -> None:
            super().__init__()
            self.rid = rid

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._order: list[str] = []  # rids in display order (first seen first)
        self._cells: dict[str, tuple[str, ...]] = {}
        self._texts: dict[str, str] = {}  # rid -> its padded row text
        self._cursor = 0  # row index; meaningless while there are no rows
        # rid -> (what the strip was built from, the strip); "" is the header's key.
        self._strips: dict[str, tuple[tuple[str, Style, int, int], Strip]] = {}

    def on_mount(self) -> None:
        self._fit_virtual_size()

    def on_resize(self) -> None:
        self._fit_virtual_size()

    def _fit_virtual_size(self) -> None:
        """Header + rows, but never less than the view: while the rows fit, requests coming and
        going leave the size alone, and so cost no layout pass of the whole screen (~13 ms on
        a small CPU, more than repainting the rows)."""
        height = max(len(self._order) + 1, self.scrollable_content_region.height)
        if self.virtual_size != (size := Size(LINE_WIDTH, height)):
            self.virtual_size = size

    # ---- reading -------------------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._order)

    def rids(self) -> list[str]:
        """Request ids in display order."""
        return list(self._order)

    def cells(self, rid: str) -> tuple[str, ...]:
        """What the row of `rid` shows, column by column."""
        return self._cells[rid]

    @property
    def selected_rid(self) -> str | None:
        return self._order[self._cursor] if self._order else None

    # ---- updating ------------------------------------------------------------------------------

    def show(self, requests: Sequence[LiveRequest], now: float) -> None:
        wanted = {r.rid: row_cells(r, now) for r in requests}
        old_order, old_texts, old_cursor = self._order, self._texts, self._cursor
        selected = self.selected_rid
        order = [rid for rid in old_order if rid in wanted]
        order += [rid for rid in wanted if rid not in old_texts]
        texts = {
            rid: old_texts[rid] if self._cells.get(rid) == cells else _padded(format_row(cells))
            for rid, cells in wanted.items()
        }
        if selected in wanted:
            cursor = order.index(selected)
        else:
            cursor = min(old_cursor, max(0, len(order) - 1))
        # The cursor moves only when rows shift under it, and shifted rows are repainted.
        changed = {
            i
            for i in range(max(len(order), len(old_order)))
            if i >= len(order)
            or i >= len(old_order)
            or order[i] != old_order[i]
            or texts[order[i]] != old_texts[order[i]]
        }
        for rid in old_order:
            if rid not in wanted:
                self._strips.pop(rid, None)  # never drawn if it was never in view
        self._order, self._cells, self._texts, self._cursor = order, wanted, texts, cursor
        if len(order) != len(old_order):
            self._fit_virtual_size()
        self._refresh_rows(changed)

    def _refresh_rows(self, indices: set[int]) -> None:
        """Repaint the rows at `indices` that are in view; the rest are drawn when scrolled to."""
        top = self.scroll_offset.y
        width, height = self.size
        regions = [
            Region(0, index + 1 - top, width, 1)
            for index in indices
            if top <= index < top + height - 1
        ]
        if regions:
            self.refresh(*regions)

    # ---- drawing -------------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.size.width
        if y == 0:
            return self._strip("", _padded(HEADER), "requests-table--header", scroll_x, width)
        index = y - 1 + scroll_y
        if index >= len(self._order):
            return Strip.blank(width, self.rich_style)
        rid = self._order[index]
        stripe = "requests-table--odd-row" if index % 2 else "requests-table--even-row"
        if index == self._cursor:
            return self._strip(rid, self._texts[rid], stripe, scroll_x, width, cursor=True)
        return self._strip(rid, self._texts[rid], stripe, scroll_x, width)

    def _strip(
        self, key: str, text: str, component: str, scroll_x: int, width: int, cursor: bool = False
    ) -> Strip:
        """The line for `text`, cached per key until its text, style or the view changes."""
        style = self.get_component_rich_style(component)
        if cursor:
            style += self.get_component_rich_style("requests-table--cursor")
        made_from = (text, style, scroll_x, width)
        cached = self._strips.get(key)
        if cached is not None and cached[0] == made_from:
            return cached[1]
        strip = Strip([Segment(text, style)], cell_len(text))
        strip = strip.crop(scroll_x, scroll_x + width).extend_cell_length(width, style)
        self._strips[key] = (made_from, strip)
        return strip

    # ---- cursor --------------------------------------------------------------------------------

    def _rows_in_view(self) -> int:
        """Rows between the header and the bottom edge (or the horizontal scrollbar)."""
        return max(1, self.scrollable_content_region.height - 1)

    def _move_cursor_to(self, index: int) -> None:
        if not self._order:
            return
        index = max(0, min(len(self._order) - 1, index))
        if index != self._cursor:
            self._refresh_rows({self._cursor, index})
            self._cursor = index
        visible = self._rows_in_view()
        top = self.scroll_offset.y
        if index < top:
            self.scroll_to(y=index, animate=False)
        elif index >= top + visible:
            self.scroll_to(y=index - visible + 1, animate=False)

    def action_move_cursor(self, delta: int) -> None:
        self._move_cursor_to(self._cursor + delta)

    def action_page(self, direction: int) -> None:
        self._move_cursor_to(self._cursor + direction * self._rows_in_view())

    def action_first(self) -> None:
        self._move_cursor_to(0)

    def action_last(self) -> None:
        self._move_cursor_to(len(self._order) - 1)

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < 1:  # a border or the header
            return
        index = offset.y - 1 + self.scroll_offset.y
        if index < len(self._order):
            self._move_cursor_to(index)

    # ---- actions -------------------------------------------------------------------------------

    def action_open_request(self) -> None:
        if (rid := self.selected_rid) is not None:
            self.post_message(self.Open(rid))

    def action_cancel_request(self) -> None:
        if (rid := self.selected_rid) is not None:
            self.post_message(self.Cancel(rid))
