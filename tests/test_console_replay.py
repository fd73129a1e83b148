"""Recordings and replays without an engine: the committed session under recordings/ drives the
real widgets; the screen at a fixed point of it is a snapshot per theme (120x40)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from llmconsole.console.app import ConsoleApp
from llmconsole.console.recording import (
    LiveSnapshot,
    RecordingError,
    decode,
    encode,
    read_recording,
)
from llmconsole.console.session import ConsoleOptions
from llmconsole.console.sources import ReplaySource
from llmconsole.console.state import ConsoleModel
from llmconsole.console.widgets.gauges import Gauges
from llmconsole.console.widgets.requests_table import RequestsTable
from llmconsole.console.widgets.step_strip import StepStrip
from llmconsole.core.telemetry import EngineEvent, RequestRecord, StepRecord

RECORDING = Path(__file__).parent.parent / "recordings" / "smollm2-cpu-load.jsonl"
SNAPSHOT_AT_S = 45.0  # into the recording: a load is running, requests are queued


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The event log prints local times: pin the zone so snapshots match anywhere."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_the_committed_recording_is_a_real_session() -> None:
    rec = read_recording(RECORDING)
    steps = [r for r in rec.records() if isinstance(r, StepRecord)]
    finished = [r for r in rec.records() if isinstance(r, RequestRecord)]
    assert rec.engine["model"] == "SmolLM2-135M-Instruct"
    assert len(steps) > 100 and len(finished) >= 40
    assert {s.kind for s in steps} >= {"prefill", "decode"}
    assert max(s.queue_len for s in steps) > 0  # the load outgrew --max-running-requests 8
    assert [s.step_id for s in steps] == sorted(s.step_id for s in steps)


@pytest.mark.parametrize("theme", ["dark", "light", "high-contrast"])
def test_main_screen_snapshot(theme: str, snap_compare: Any, utc: None) -> None:
    app = ConsoleApp(recording=read_recording(RECORDING), options=ConsoleOptions(theme=theme))

    async def run_before(pilot: Any) -> None:
        assert isinstance(app.source, ReplaySource)
        app.source.seek(SNAPSHOT_AT_S)
        app.refresh_all()
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 40), run_before=run_before)


def test_replay_fills_table_strip_and_counters_like_the_session(utc: None) -> None:
    rec = read_recording(RECORDING)
    app = ConsoleApp(recording=rec)
    position = SNAPSHOT_AT_S
    cut = rec.started + position
    live = [e for e in rec.entries if isinstance(e, LiveSnapshot) and e.time <= cut][-1]
    steps = [r for r in rec.records() if isinstance(r, StepRecord) and r.time <= cut]

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            assert isinstance(app.source, ReplaySource)
            app.source.seek(position)
            app.refresh_all()
            await pilot.pause()
            table = app.query_one(RequestsTable)
            assert table.row_count == len(live.requests) > 0
            assert table.rids() == [r.rid for r in live.requests]
            assert app.model.total_steps == len(steps)
            assert app.query_one(StepStrip).visible_steps()[-1] == steps[-1]
            assert "paused" in app.status and f"{position:.0f}/" in app.status
            # This recording predates the steps' byte counts: the memory row says so.
            assert "mem read not in this recording" in app.query_one(Gauges).render().plain

    asyncio.run(run())


def test_replay_clock_speed_pause_and_seek() -> None:
    rec = read_recording(RECORDING)
    wall = [100.0]
    source = ReplaySource(rec, speed=2.0, clock=lambda: wall[0])
    first = source.poll()  # what happened before the recorder started (the engine's start)
    assert all(r.time <= rec.started for r in first)
    wall[0] += 20.0  # 40 s of recording at 2x
    got = source.poll()
    assert got and all(r.time <= rec.started + 40.0 for r in got)
    source.toggle_pause()
    wall[0] += 100.0
    assert source.poll() == [] and source.now() == pytest.approx(rec.started + 40.0)
    source.toggle_pause()
    source.set_speed(1000.0)
    wall[0] += 1.0
    rest = source.poll()
    assert source.finished and len(first) + len(got) + len(rest) == len(rec.records())
    with pytest.raises(ValueError, match="speed"):
        source.set_speed(0)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_damaged_recordings_give_clear_errors(tmp_path: Path) -> None:
    header = json.dumps({"type": "session", "version": 1, "started": 1.0, "engine": {}})
    step = RECORDING.read_text(encoding="utf-8").splitlines()[3]
    with pytest.raises(RecordingError, match="no recording"):
        read_recording(tmp_path / "missing.jsonl")
    with pytest.raises(RecordingError, match="empty"):
        read_recording(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(RecordingError, match="not an llmconsole recording"):
        read_recording(_write(tmp_path / "csv.jsonl", ["a,b,c", "1,2,3"]))
    future = json.dumps({"type": "session", "version": 99})
    with pytest.raises(RecordingError, match="format 99"):
        read_recording(_write(tmp_path / "new.jsonl", [future]))
    with pytest.raises(RecordingError, match=r"bad\.jsonl:2"):
        read_recording(_write(tmp_path / "bad.jsonl", [header, "{not json", step]))
    # A console killed mid-write leaves half a last line: everything before it still plays.
    cut = read_recording(_write(tmp_path / "cut.jsonl", [header, step, step[:40]]))
    assert len(cut.entries) == 1


def test_model_buckets_seconds_and_counts_failures() -> None:
    model = ConsoleModel(chart_seconds=10)

    def step(t: float, generated: int, running: int = 1) -> StepRecord:
        return StepRecord(
            0, t, "decode", running, running, generated, False, 0, 0.01, 0, running, 1, 9
        )

    model.apply([step(100.2, 4), step(100.7, 4, running=3), step(103.1, 2)])
    xs, toks, running, _ = model.chart_series(now=104.5)
    assert xs == [-4.0, -3.0, -2.0, -1.0] and toks == [8.0, 0.0, 0.0, 2.0]
    assert running == [3.0, 0.0, 0.0, 1.0]
    ok = RequestRecord("a", 1.0, 1.1, 2.0, 3, 0, 4, 0, "stop")
    bad = RequestRecord("b", 1.0, None, 2.0, 3, 0, 0, 0, "abort")
    changes = model.apply([ok, bad, EngineEvent(5.0, "export", "x")])
    assert changes.requests and [e.kind for e in changes.events] == ["export"]
    assert (model.finished_ok, model.finished_failed) == (1, 1)
    assert len(model.session) == 6


def test_model_charts_the_prefix_hit_rate_per_second_and_over_ten_seconds() -> None:
    model = ConsoleModel(chart_seconds=30)
    base = StepRecord(0, 0.0, "prefill", 1, 8, 1, False, 0, 0.01, 0, 1, 9, 99, kv_pages_cached=5)

    def step(t: float, cached: int, admitted: int, kind: str = "prefill") -> StepRecord:
        return replace(base, time=t, kind=kind, cached_tokens=cached, admitted_tokens=admitted)

    assert model.prefix_hit_rate(100.0) is None and model.kv_usage() == (0, 0, 0)
    # second 100: a miss and a hit on the same prefix; 101: decode only; 104: a full hit
    model.apply([step(100.1, 0, 40), step(100.6, 30, 40), step(101.2, 0, 0, "decode")])
    model.apply([step(104.5, 39, 40)])
    assert model.hit_rate_series(now=104.9, seconds=6) == [None, 30 / 80, None, None, None, 39 / 40]
    assert model.prefix_hit_rate(104.9) == (30 + 39) / (80 + 40)  # tokens, not a mean of rates
    assert model.prefix_hit_rate(109.9) == (30 + 39) / (80 + 40)  # seconds 100-109
    assert model.prefix_hit_rate(110.0) == 39 / 40  # second 100 has left the window
    assert model.prefix_hit_rate(115.0) is None
    assert model.kv_usage() == (9, 5, 99)


def test_model_reads_decode_bytes_over_decode_time_in_the_last_three_seconds() -> None:
    model = ConsoleModel()
    base = StepRecord(0, 0.0, "decode", 8, 8, 8, True, 8, 0.01, 0, 8, 9, 99)
    assert model.decode_read_rate(100.0) is None and not model.bytes_recorded
    model.apply([replace(base, time=95.0, bytes_read=10**12)])  # outside the window at 100
    model.apply([replace(base, time=97.5, kind="prefill", duration_s=0.5, bytes_read=10**12)])
    model.apply([replace(base, time=t, bytes_read=20 * 10**9) for t in (98.0, 99.0, 99.5)])
    # 3 x 20 GB in 3 x 10 ms, the prefill's bytes and the gaps between steps left out
    assert model.decode_read_rate(100.0) == 20e9 / 0.01 and model.bytes_recorded
    assert model.decode_read_rate(110.0) is None


def test_recordings_from_before_the_prefix_cache_fields_still_load() -> None:
    """The committed recording predates kv_pages_cached / cached_tokens / admitted_tokens: its
    steps load with zeros; a new step keeps them through a recording's encode and decode."""
    lines = [json.loads(line) for line in RECORDING.read_text(encoding="utf-8").splitlines()]
    assert not any("kv_pages_cached" in obj for obj in lines if obj["type"] == "step")
    steps = [r for r in read_recording(RECORDING).records() if isinstance(r, StepRecord)]
    assert steps and all(
        (s.kv_pages_cached, s.cached_tokens, s.admitted_tokens, s.bytes_read) == (0, 0, 0, 0)
        for s in steps
    )
    new = replace(
        steps[0],
        accepted_per_position=(1, 0),
        kv_pages_cached=12,
        cached_tokens=24,
        admitted_tokens=54,
        bytes_read=123_456_789,
    )
    assert decode(json.loads(json.dumps(encode(new)))) == new


def test_the_gpu_recording_shows_graphs_up_to_max_bs_then_eager() -> None:
    """The workshop's lesson, recorded on an H100 (recordings/record_gpu_demo.py): with
    --cuda-graph-max-bs 8, decode batches of 4 and 8 replay graphs; a batch of 24 runs eager."""
    rec = read_recording(RECORDING.with_name("llama3-8b-h100-graphs.jsonl"))
    assert rec.engine["config"]["cuda_graph_max_bs"] == 8
    decode = [r for r in rec.records() if isinstance(r, StepRecord) and r.kind == "decode"]
    assert all(s.cuda_graph == (s.batch_size <= 8) for s in decode)
    assert all(s.padded_bs >= s.batch_size for s in decode if s.cuda_graph)
    assert {s.batch_size for s in decode} >= {4, 8, 24}
    events = [r for r in rec.records() if isinstance(r, EngineEvent)]
    assert any(e.kind == "cuda_graph" and e.data["batch_sizes"] == [1, 2, 4, 8] for e in events)
