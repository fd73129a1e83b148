"""The running-requests table on its own, driven by Textual's pilot: rows, cursor, keys, drawing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from textual.app import App, ComposeResult
from textual.pilot import Pilot

from llmconsole.console.widgets.requests_table import HEADER, RequestsTable, format_row
from llmconsole.core.telemetry import LiveRequest

NOW = 1000.0
ROWS_IN_VIEW = 9  # the table is 10 lines: the header, then 9 rows


def live(rid: str, generated: int = 4, state: str = "decode") -> LiveRequest:
    return LiveRequest(
        rid=rid,
        state=state,
        arrival=NOW - 2.0,
        first_token=NOW - 1.5 if generated else None,
        prompt_tokens=12,
        cached_tokens=0,
        generated_tokens=generated,
        computed_tokens=12 + generated,
    )


class TableApp(App[None]):
    CSS = "RequestsTable { height: 10; }"

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[str] = []
        self.cancelled: list[str] = []

    def compose(self) -> ComposeResult:
        yield RequestsTable()

    def on_requests_table_open(self, message: RequestsTable.Open) -> None:
        self.opened.append(message.rid)

    def on_requests_table_cancel(self, message: RequestsTable.Cancel) -> None:
        self.cancelled.append(message.rid)


def drive(script: Callable[[TableApp, RequestsTable, Pilot[None]], Awaitable[None]]) -> TableApp:
    app = TableApp()

    async def run() -> None:
        async with app.run_test(size=(80, 12)) as pilot:
            table = app.query_one(RequestsTable)
            await script(app, table, pilot)

    asyncio.run(run())
    return app


def line(table: RequestsTable, y: int) -> str:
    return table.render_line(y).text


def test_rows_appear_in_order_under_the_header() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live("req-b"), live("req-a", generated=0, state="queued")], NOW)
        await pilot.pause()
        assert table.rids() == ["req-b", "req-a"] and table.row_count == 2
        assert table.cells("req-a")[:2] == ("req-a", "queued")
        assert HEADER in line(table, 0)
        assert format_row(table.cells("req-b")) in line(table, 1)
        assert format_row(table.cells("req-a")) in line(table, 2)
        assert line(table, 3).strip() == ""

    drive(script)


def test_updates_change_rows_in_place_and_new_rows_go_last() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live("a"), live("b")], NOW)
        await pilot.pause()
        # b progressed, the engine now lists it first, and c arrived: nothing is resorted.
        table.show([live("c"), live("b", generated=30), live("a")], NOW + 1.0)
        await pilot.pause()
        assert table.rids() == ["a", "b", "c"]
        assert table.cells("b")[4] == "30"
        assert format_row(table.cells("b")) in line(table, 2)
        assert format_row(table.cells("c")) in line(table, 3)

    drive(script)


def test_an_update_repaints_only_the_changed_row() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live("a"), live("b"), live("c")], NOW)
        await pilot.pause()
        table.show([live("a"), live("b", generated=9), live("c")], NOW)
        # What the compositor will redraw on the next idle: line 2 (b's row), nothing else.
        assert {(r.y, r.height) for r in table._repaint_regions} == {(2, 1)}
        await pilot.pause()
        assert format_row(table.cells("b")) in line(table, 2)

    drive(script)


def test_vanished_requests_lose_their_rows() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live("a"), live("b"), live("c")], NOW)
        await pilot.pause()
        table.show([live("a"), live("c")], NOW)
        await pilot.pause()
        assert table.rids() == ["a", "c"] and table.row_count == 2
        assert format_row(table.cells("c")) in line(table, 2)
        assert line(table, 3).strip() == ""
        table.show([], NOW)
        await pilot.pause()
        assert table.row_count == 0 and table.selected_rid is None
        assert line(table, 1).strip() == ""

    drive(script)


def test_requests_coming_and_going_within_the_view_need_no_layout_pass() -> None:
    # A layout pass re-arranges the whole screen (~13 ms on a small CPU): rows that fit in the
    # view must only repaint; a table that outgrows the view grows and scrolls.
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        layouts: list[int] = []
        refresh = table.refresh

        def counting_refresh(*regions: object, layout: bool = False, **kw: object) -> object:
            layouts.append(layout)
            return refresh(*regions, layout=layout, **kw)  # type: ignore[arg-type]

        table.refresh = counting_refresh  # type: ignore[method-assign]
        height = table.virtual_size.height
        for n in (3, 5, 1, ROWS_IN_VIEW, 0):
            table.show([live(f"r{i}") for i in range(n)], NOW)
            await pilot.pause()
            assert table.virtual_size.height == height
        assert layouts and not any(layouts)
        table.show([live(f"r{i:02d}") for i in range(30)], NOW)
        await pilot.pause()
        assert table.virtual_size.height == 31  # the header and 30 rows: it scrolls

    drive(script)


def test_arrow_keys_move_the_selection_within_the_rows() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live("a"), live("b"), live("c")], NOW)
        table.focus()
        await pilot.pause()
        assert table.selected_rid == "a"
        await pilot.press("down", "down", "down")
        assert table.selected_rid == "c"  # stops at the last row
        await pilot.press("up")
        assert table.selected_rid == "b"
        await pilot.press("home")
        assert table.selected_rid == "a"
        await pilot.press("end")
        assert table.selected_rid == "c"

    drive(script)


def test_enter_opens_and_x_cancels_the_selected_request() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live("a"), live("b")], NOW)
        table.focus()
        await pilot.pause()
        await pilot.press("down", "enter")
        await pilot.press("up", "x")
        await pilot.pause()

    app = drive(script)
    assert app.opened == ["b"] and app.cancelled == ["a"]


def test_keys_do_nothing_on_an_empty_table() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.focus()
        await pilot.press("down", "end", "enter", "x")
        await pilot.pause()
        assert table.selected_rid is None

    app = drive(script)
    assert app.opened == [] and app.cancelled == []


def test_selection_follows_its_request_and_clamps_when_it_vanishes() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live(rid) for rid in "abcd"], NOW)
        table.focus()
        await pilot.press("down", "down")
        assert table.selected_rid == "c"
        table.show([live(rid) for rid in "bcd"], NOW)  # a row above it went: c stays selected
        assert table.selected_rid == "c"
        table.show([live(rid) for rid in "bd"], NOW)  # c went: the same index, now d
        assert table.selected_rid == "d"
        table.show([live("b")], NOW)  # past the end: clamped to the last row
        assert table.selected_rid == "b"
        await pilot.pause()
        cursor_style = table.render_line(1)._segments[0].style
        table.show([live("b"), live("e")], NOW)
        await pilot.pause()
        assert table.render_line(1)._segments[0].style == cursor_style  # still highlighted

    drive(script)


def test_cursor_row_is_highlighted_and_rows_are_striped() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live(rid) for rid in "abcd"], NOW)
        table.focus()
        await pilot.pause()

        def background(y: int) -> object:
            return table.render_line(y)._segments[0].style.bgcolor

        cursor, even, odd = background(1), background(3), background(2)
        assert len({cursor, even, odd}) == 3
        assert table.render_line(0)._segments[0].style.bold  # the header
        await pilot.press("down")
        assert background(2) == cursor and background(1) == even
        table.blur()
        await pilot.pause()
        assert background(2) not in (cursor, odd)  # a dimmer cursor while unfocused

    drive(script)


def test_long_tables_scroll_under_a_fixed_header() -> None:
    rids = [f"r{i:02d}" for i in range(30)]

    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live(rid) for rid in rids], NOW)
        table.focus()
        await pilot.pause()
        await pilot.press("end")
        await pilot.pause()
        assert table.selected_rid == "r29"
        assert HEADER in line(table, 0)
        assert "r29" in line(table, ROWS_IN_VIEW)  # the last line in view
        assert "r21" in line(table, 1)
        await pilot.press("pageup")
        await pilot.pause()
        assert table.selected_rid == "r20" and "r20" in line(table, 1)
        await pilot.press("home")
        await pilot.pause()
        assert "r00" in line(table, 1) and HEADER in line(table, 0)

    drive(script)


def test_clicking_a_row_selects_it() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live(rid) for rid in "abc"], NOW)
        await pilot.pause()
        await pilot.click(RequestsTable, offset=(5, 3))  # line 3: the third row
        assert table.selected_rid == "c"
        await pilot.click(RequestsTable, offset=(5, 0))  # the header selects nothing
        assert table.selected_rid == "c"

    drive(script)


def test_a_narrow_table_scrolls_sideways_with_its_header() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.styles.width = 30
        table.show([live("a")], NOW)
        table.focus()
        await pilot.pause()
        assert "accepted" not in line(table, 0) and len(line(table, 0)) == 30
        await pilot.press(*["right"] * 40)  # scrolls, as in any ScrollView
        await pilot.pause()
        assert line(table, 0).rstrip().endswith("accepted")
        assert line(table, 1).rstrip().endswith(table.cells("a")[-1])

    drive(script)


def test_switching_theme_restyles_the_rows() -> None:
    async def script(app: TableApp, table: RequestsTable, pilot: Pilot[None]) -> None:
        table.show([live("a"), live("b")], NOW)
        await pilot.pause()
        app.theme = "textual-dark"
        await pilot.pause()
        dark = table.render_line(2)._segments[0].style.bgcolor
        app.theme = "textual-light"
        await pilot.pause()
        assert table.render_line(2)._segments[0].style.bgcolor != dark

    drive(script)
