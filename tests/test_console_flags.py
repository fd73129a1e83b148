"""The console's flags editor (`f`): a hot restart from the modal while the console's own API
streams requests, on the real default model, driven by Textual's pilot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from console_utils import client_for, fire, until
from engine_utils import wait_idle

from llmconsole.console.app import ConsoleApp
from llmconsole.console.screens.flags_editor import FlagsEditor, edited
from llmconsole.console.widgets.event_log import EventLog
from llmconsole.console.widgets.step_strip import StepStrip
from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.telemetry import EngineEvent

SIZE = (120, 40)
PROMPTS = [f"Count from {i} to thirty:" for i in range(6)]
# The streams must still run when the restart lands, ~2 s of clicks after they start. How many
# tokens that takes depends on the machine, so it is sized from a probe (a size, not a check).
STREAM_SECONDS = 10.0


def streaming_max_tokens(engine: Engine) -> int:
    """max_tokens that keeps PROMPTS streaming for ~STREAM_SECONDS on this machine."""
    probe = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    engine.generate(PROMPTS, probe)  # the first batched step packs the CPU weights: not timed
    started = time.perf_counter()
    engine.generate(PROMPTS, probe)
    per_second = 32 / (time.perf_counter() - started)
    return int(min(1000, max(150, per_second * STREAM_SECONDS)))


async def press(pilot, selector: str) -> None:
    """Click a button, then let its 0.2 s "active" effect pass (a button ignores clicks
    while it shows it, as it would a user's)."""
    await pilot.click(selector)
    await pilot.pause(0.3)


@pytest.fixture
def fresh() -> Iterator[Engine]:
    eng = Engine(EngineConfig())
    yield eng
    eng.shutdown()


def test_flags_editor_restarts_the_engine_without_losing_a_stream(
    fresh: Engine, engine: Engine
) -> None:
    max_tokens = streaming_max_tokens(engine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    expected = [r.text for r in engine.generate(PROMPTS, params)]
    app = ConsoleApp(engine=fresh)

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                futures = fire(pool, client_for(app), PROMPTS, max_tokens)
                await until(pilot, lambda: fresh.counters["generated_tokens"] >= 12)
                await pilot.press("f")
                editor = app.screen
                assert isinstance(editor, FlagsEditor)
                editor.set_text("page_size", "4")
                editor.set_text("max_total_tokens", "16384")
                await press(pilot, "#apply")
                summary = str(editor.query_one("#summary").render())
                assert "--page-size 1 -> 4" in summary and "rebuild" in summary
                assert fresh.config.page_size == 1  # nothing happens before Confirm
                await press(pilot, "#apply")  # Confirm
                await until(pilot, lambda: not isinstance(app.screen, FlagsEditor))
                await until(pilot, lambda: fresh.config.page_size == 4 and not app.restarting)
                results = [await asyncio.wrap_future(f) for f in futures]
            assert [text for text, _ in results] == expected
            assert all(reason == "length" for _, reason in results)
            await until(pilot, lambda: not app.model.live)
            app.refresh_all()
            # The first step after the restart is marked; selecting it says why.
            (marked,) = app.model.restart_steps
            strip = app.query_one(StepStrip)
            steps = [s for s in app.model.steps if s.step_id <= marked + 3]
            strip.show(steps, app.model.restart_steps)  # the marked step in view, at a known place
            # The pointer is left where the modal's Confirm button was: over the strip once
            # enough steps fill it, and a hovered step wins over the keyboard's.
            await pilot.hover("#header")
            strip.focus()
            for _ in range(3):
                await pilot.press("left")
            assert "first step after restart (rebuild)" in str(strip.render())
            header = str(app.query_one("#header").render())
            assert "--page-size 4" in header and "--max-total-tokens 16384" in header
            log = app.query_one(EventLog)
            assert any("restart done" in str(line) for line in log.lines)

    asyncio.run(run())
    wait_idle(fresh)
    fresh.check_integrity()
    events = {e.kind: e for e in fresh.telemetry.snapshot() if isinstance(e, EngineEvent)}
    assert events["restart_end"].data["resumed_requests"] == len(PROMPTS)  # mid-stream


def test_flags_editor_rejects_bad_values_and_reverts(fresh: Engine) -> None:
    app = ConsoleApp(engine=fresh)

    async def run() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f")
            editor = app.screen
            assert isinstance(editor, FlagsEditor)
            await press(pilot, "#apply")
            assert "nothing changed" in str(editor.query_one("#error").render())
            editor.set_text("page_size", "0")
            await press(pilot, "#apply")
            assert "--page-size must be >= 1" in str(editor.query_one("#error").render())
            editor.set_text("page_size", "2")
            editor.set_text("attention_backend", "triton")  # no GPU here
            await press(pilot, "#apply")
            assert "needs a CUDA device" in str(editor.query_one("#error").render())
            await press(pilot, "#revert")
            assert edited(fresh.describe()["config"], editor.texts()) == {}
            await pilot.press("escape")
            assert not isinstance(app.screen, FlagsEditor)
            assert fresh.config.page_size == 1 and fresh.config.attention_backend == "torch"
            # The palette's per-flag entries open the editor on that flag.
            titles = [c.title for c in app.get_system_commands(app.screen)]
            assert "Set CUDA-graph max batch size…" in titles
            assert "Edit engine flags…" in titles
            app.action_flags("max_running_requests")
            await pilot.pause()
            assert app.focused is not None and app.focused.id == "new-max_running_requests"
            app.screen.set_text("max_running_requests", "4")
            await pilot.press("enter")  # Apply
            await pilot.press("enter")  # Confirm
            await until(pilot, lambda: fresh.config.max_running_requests == 4)
            await until(pilot, lambda: not app.restarting)
            assert "4" in str(app.query_one("#header").render())

    asyncio.run(run())
    events = [e for e in fresh.telemetry.snapshot() if isinstance(e, EngineEvent)]
    assert [e.kind for e in events if e.kind != "start"] == ["config_change"]
