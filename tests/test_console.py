"""The console app driven by Textual's pilot, on the real default model: real HTTP requests from
the official `openai` client through the console's in-process API."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import gc
import io
import re
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from console_utils import client_for, fire, until
from engine_utils import wait_idle
from rich.console import Console

from llmconsole.console.app import ConsoleApp
from llmconsole.console.recording import read_recording
from llmconsole.console.screens.help import HelpScreen
from llmconsole.console.screens.load_dialog import LoadDialog
from llmconsole.console.screens.request_detail import RequestScreen
from llmconsole.console.session import ConsoleOptions
from llmconsole.console.widgets.event_log import EventLog
from llmconsole.console.widgets.gauges import Gauges
from llmconsole.console.widgets.requests_table import RequestsTable
from llmconsole.console.widgets.step_strip import StepStrip
from llmconsole.core import Engine, EngineConfig, RequestRecord
from llmconsole.core.server import bind_socket
from llmconsole.core.telemetry import StepRecord

SIZE = (120, 40)


def test_console_starts_its_own_engine_and_api_and_quits_cleanly() -> None:
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = ConsoleApp(config=EngineConfig(port=port), sock=sock)
    switch_interval = sys.getswitchinterval()

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.status == "serving", timeout=120)
            # The loaded engine's objects are kept out of the garbage collector's full passes.
            await until(pilot, lambda: gc.get_freeze_count() > 0)
            header = str(app.query_one("#header").render())
            assert "SmolLM2-135M-Instruct" in header and f"127.0.0.1:{port}/v1" in header
            assert app.query_one("#loading").has_class("-hidden")
            models = await asyncio.to_thread(lambda: client_for(app).models.list())
            assert models.data[0].id == "SmolLM2-135M-Instruct"
            await pilot.press("q")
        assert app.session is not None and not app.session.engine.alive

    asyncio.run(run())
    # The interpreter is as the console found it.
    assert gc.get_freeze_count() == 0 and sys.getswitchinterval() == switch_interval
    with pytest.raises(OSError):  # the API stopped with the console
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


STREAM_TOKENS = 256


def test_requests_fill_the_table_and_steps_accumulate(engine: Engine) -> None:
    app = ConsoleApp(engine=engine)
    prompts = [f"Count from {i} to twenty:" for i in range(4)]

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            table = app.query_one(RequestsTable)
            strip = app.query_one(StepStrip)
            steps_before = app.model.total_steps
            with ThreadPoolExecutor(4) as pool:
                # Long enough to outlive a repaint interval (up to 2 s on a small machine) with
                # room to spare: at batch 4 the CPU box makes ~40 tokens a second per request.
                futures = fire(pool, client_for(app), prompts, max_tokens=STREAM_TOKENS)
                await until(pilot, lambda: table.row_count == 4)
                states = {table.cells(rid)[1] for rid in table.rids()}
                assert states <= {"queued", "prefill", "decode"}
                results = [await asyncio.wrap_future(f) for f in futures]
            assert all(reason == "length" for _, reason in results)
            await until(pilot, lambda: table.row_count == 0)
            assert app.model.total_steps - steps_before >= STREAM_TOKENS
            shown = strip.visible_steps()
            assert shown and shown[-1].step_id == app.model.last_step.step_id
            assert any(s.kind == "decode" and s.batch_size == 4 for s in shown)
            # The newest step's details: how fast it read its weights and KV.
            details = str(strip.render()).splitlines()[1]
            assert re.search(r"\d ms · reads \d[\d.]* [MGT]B/s", details), details
            assert app.model.total_generated >= 4 * STREAM_TOKENS

    asyncio.run(run())
    wait_idle(engine)


def test_gauges_show_the_prefix_cache_and_its_hit_rate() -> None:
    """Requests sharing a long prefix, one after another over HTTP: the KV gauge shows the
    finished ones' pages as cached (reclaimable), and the prefix row its hit rate. An engine of
    its own: the shared one's earlier steps would be in the gauges' 10 s window."""
    app: ConsoleApp
    prefix = "You answer every question in one short sentence, politely and plainly. " * 4
    questions = ["What is two plus two?", "Name a colour.", "Name a fruit."]

    def gauges() -> str:
        return app.query_one(Gauges).render().plain

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "prefix" in gauges())
            assert "+0% cached" in gauges() and "hit — (10 s)" in gauges()
            assert "mem read no decode step lately" in gauges()
            with ThreadPoolExecutor(1) as pool:
                for question in questions:
                    (future,) = fire(pool, client_for(app), [prefix + question], max_tokens=4)
                    await asyncio.wrap_future(future)
            # Decode read the weights and KV at some rate: shown with its share of the copy rate.
            read = r"mem read [█░]+ (\d[\d.]*) ([MGT])B/s (\d+|<1)%"
            await until(pilot, lambda: re.search(read, gauges()) is not None)
            # Painted after the last step: nothing runs, every request's pages are the cache's.
            await until(pilot, lambda: re.search(r"finished 3$", gauges()) is not None)
            await until(pilot, lambda: re.search(r" 0/\d+ max", gauges()) is not None)
            text = gauges()
            hit = int(re.search(r"hit (\d+)% \(10 s\)", text).group(1))  # type: ignore[union-attr]
            assert 30 <= hit < 100, text  # the first request missed, the others read the prefix
            assert re.search(r"\+[1-9]\d*% cached", text), text
            # The same pages as counts, in the panel's bottom border: none held by a request.
            total = engine.stats()["kv_pages_total"]
            pages = str(app.query_one(Gauges).border_subtitle)
            cached_pages = re.fullmatch(rf"0 used \+ (\d+) cached / {total} pages", pages)
            assert cached_pages and int(cached_pages.group(1)) > 0, pages
            assert any(spark in text for spark in "▂▃▄▅▆▇█"), text  # a second with hits
            # A flush (here the engine's own; /flush_cache is the same) frees those pages with
            # no step after it: the gauge and the event log say so at once.
            freed = await asyncio.to_thread(engine.flush_cache)
            assert freed > 0
            await until(pilot, lambda: "+0% cached" in gauges())
            await until(
                pilot, lambda: app.query_one(Gauges).border_subtitle.startswith("0 used + 0 cached")
            )
            flushes = [e.data["freed"] for e in app.model.events if e.kind == "cache_flush"]
            assert flushes == [freed]

    # A small pool, so the cached prefix is a visible share of it.
    with Engine(EngineConfig(max_total_tokens=2048)) as engine:
        app = ConsoleApp(engine=engine)
        asyncio.run(run())
        wait_idle(engine)
        engine.check_integrity()


def test_cancel_from_the_table_aborts_the_request_and_frees_its_pages(engine: Engine) -> None:
    app = ConsoleApp(engine=engine)

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            table = app.query_one(RequestsTable)
            with ThreadPoolExecutor(1) as pool:
                (future,) = fire(pool, client_for(app), ["Tell me a long story."], 4000)
                await until(pilot, lambda: table.row_count == 1)
                (rid,) = table.rids()
                await until(pilot, lambda: app.model.live and app.model.live[0].state == "decode")
                table.focus()
                await pilot.press("x")
                text, reason = await asyncio.wrap_future(future)
            assert reason == "error"  # OpenAI has no "cancelled"; the stream ends early
            await until(pilot, lambda: table.row_count == 0)
            record = next(
                r for r in app.model.finished if isinstance(r, RequestRecord) and r.rid == rid
            )
            assert record.finish_reason == "abort" and 0 < record.completion_tokens < 4000

    asyncio.run(run())
    wait_idle(engine)
    engine.check_integrity()


def test_enter_opens_the_request_with_its_prompt_and_text_so_far(engine: Engine) -> None:
    app = ConsoleApp(engine=engine)

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            table = app.query_one(RequestsTable)
            with ThreadPoolExecutor(1) as pool:
                (future,) = fire(pool, client_for(app), ["Name three colours."], 400)
                await until(
                    pilot, lambda: bool(app.model.live) and app.model.live[0].generated_tokens > 3
                )
                await until(pilot, lambda: table.row_count == 1)  # painted (2 Hz)
                table.focus()
                await pilot.press("enter")
                await until(pilot, lambda: isinstance(app.screen, RequestScreen))
                screen = app.screen
                prompt = str(screen.query_one("#prompt").render())
                assert "Name three colours." in prompt
                await until(pilot, lambda: len(str(screen.query_one("#output").render())) > 5)
                await pilot.press("x")  # cancel from the detail view, too
                await asyncio.wrap_future(future)
            assert not isinstance(app.screen, RequestScreen)

    asyncio.run(run())
    wait_idle(engine)


def test_export_writes_csvs_whose_rows_match_the_engine_records(
    engine: Engine, tmp_path: Path
) -> None:
    app = ConsoleApp(engine=engine, options=ConsoleOptions(export_dir=tmp_path))

    async def run() -> Path:
        async with app.run_test(size=SIZE) as pilot:
            with ThreadPoolExecutor(3) as pool:
                futures = fire(pool, client_for(app), ["a", "b c", "d e f"], max_tokens=8)
                for f in futures:
                    await asyncio.wrap_future(f)
            await until(pilot, lambda: not app.model.live)
            await pilot.press("e")
            await until(pilot, lambda: any(e.kind == "export" for e in app.model.events))
            folder = next(tmp_path.glob("llmconsole-session-*"))
            return folder

    folder = asyncio.run(run())
    records = engine.telemetry.snapshot()
    requests = {r.rid: r for r in records if isinstance(r, RequestRecord)}
    with open(folder / "requests.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["rid"] for r in rows} <= set(requests) and len(rows) >= 3
    for row in rows:
        rec = requests[row["rid"]]
        assert int(row["completion_tokens"]) == rec.completion_tokens
        assert row["finish_reason"] == rec.finish_reason
        assert dt.datetime.fromisoformat(row["finish"]).timestamp() == pytest.approx(rec.finish)
    steps = {r.step_id: r for r in records if isinstance(r, StepRecord)}
    with open(folder / "steps.csv", newline="") as fh:
        step_rows = list(csv.DictReader(fh))
    assert step_rows and all(
        int(r["batch_size"]) == steps[int(r["step_id"])].batch_size for r in step_rows
    )
    with open(folder / "events.csv", newline="") as fh:
        kinds = [r["kind"] for r in csv.DictReader(fh)]
    assert "start" in kinds


def test_load_generator_sends_real_requests_and_reports(engine: Engine) -> None:
    app = ConsoleApp(engine=engine)

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("l")
            await until(pilot, lambda: isinstance(app.screen, LoadDialog))
            dialog = app.screen
            # A bad value is refused in the dialog; nothing is sent.
            dialog.query_one("#concurrency").value = "many"
            await pilot.click("#start")
            assert "whole number" in str(dialog.query_one("#error").render())
            assert app.load is None
            dialog.query_one("#concurrency").value = "3"
            dialog.query_one("#requests").value = "6"
            dialog.query_one("#max_tokens").value = "8"
            await pilot.pause(0.3)  # a button ignores clicks during its 0.2 s press effect
            await pilot.click("#start")
            await until(pilot, lambda: app.load is not None)
            await until(
                pilot, lambda: any("load finished" in e.message for e in app.model.events), 120
            )
            message = next(e.message for e in app.model.events if "load finished" in e.message)
            assert "6 ok, 0 failed" in message

    asyncio.run(run())
    wait_idle(engine)


def test_stopping_a_load_cancels_its_requests(engine: Engine) -> None:
    app = ConsoleApp(engine=engine)

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            from llmconsole.console.load_runner import LoadSettings

            app.start_load(LoadSettings(concurrency=4, num_requests=40, max_tokens=2000))
            await until(pilot, lambda: len(app.model.live) == 4)
            await pilot.press("L")
            await until(pilot, lambda: any("load stopped" in e.message for e in app.model.events))
            await until(pilot, lambda: not app.model.live)

    asyncio.run(run())
    wait_idle(engine)
    engine.check_integrity()


def test_help_screen_lists_every_key_and_palette_has_every_action(engine: Engine) -> None:
    app = ConsoleApp(engine=engine)

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen))
            console = Console(width=100, record=True, file=io.StringIO())
            console.print(app.screen.table)
            shown = console.export_text()
            for action in ("Quit", "Load", "Export CSV", "Screenshot", "Cancel request"):
                assert action in shown
            await pilot.press("escape")
            titles = {c.title for c in app.get_system_commands(app.screen)}
            for title in (
                "Start a load…",
                "Stop the load",
                "Export session to CSV",
                "Save screenshot (SVG)",
                "Show keys",
                "Cancel the selected request",
                "Console theme: high-contrast",
            ):
                assert title in titles

    asyncio.run(run())


def test_screenshot_saves_an_svg(engine: Engine, tmp_path: Path) -> None:
    app = ConsoleApp(engine=engine, options=ConsoleOptions(export_dir=tmp_path))

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("s")
            await until(pilot, lambda: any(tmp_path.glob("*.svg")))

    asyncio.run(run())
    svg = next(tmp_path.glob("*.svg")).read_text()
    assert svg.startswith("<svg") and "running requests" in svg.replace("&#160;", " ")


def test_record_then_replay_drives_the_same_widgets(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"
    live = ConsoleApp(engine=engine, options=ConsoleOptions(record=path))

    async def record() -> int:
        async with live.run_test(size=SIZE) as pilot:
            with ThreadPoolExecutor(2) as pool:
                for f in fire(pool, client_for(live), ["one", "two three"], max_tokens=16):
                    await asyncio.wrap_future(f)
            await until(pilot, lambda: not live.model.live)
            await pilot.press("q")
        return live.model.total_steps

    asyncio.run(record())
    recording = read_recording(path)
    recorded_steps = [e for e in recording.records() if isinstance(e, StepRecord)]
    assert recording.engine["model"] == "SmolLM2-135M-Instruct" and recorded_steps
    assert any(e.requests for e in recording.entries if hasattr(e, "requests"))

    replay = ConsoleApp(recording=recording, options=ConsoleOptions(replay_speed=1000))

    async def play() -> None:
        async with replay.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: replay.source.finished)  # type: ignore[union-attr]
            strip = replay.query_one(StepStrip)
            await until(pilot, lambda: bool(strip.visible_steps()))  # the next repaint
            assert replay.model.total_steps == len(recorded_steps)
            assert strip.visible_steps()[-1].step_id == recorded_steps[-1].step_id
            assert replay.query_one(EventLog).lines  # start event at least
            assert replay.model.finished_ok >= 2
            await pilot.press("x")  # read-only: a warning, nothing else
            await pilot.press("space")
            assert replay.source.paused  # type: ignore[union-attr]

    asyncio.run(play())
