from __future__ import annotations

import csv
import datetime as dt

from llmconsole.core.telemetry import (
    EngineEvent,
    RequestRecord,
    StepRecord,
    TelemetryBuffer,
    export_session,
)


def step(i: int) -> StepRecord:
    return StepRecord(i, 1_700_000_000.0 + i, "decode", 4, 4, 4, False, 4, 0.01, 0, 4, 10, 100)


def test_ring_buffer_keeps_the_newest_and_counts_what_a_slow_reader_missed() -> None:
    buf = TelemetryBuffer(capacity=16)
    sub = buf.subscribe()
    for i in range(10):
        buf.append(step(i))
    assert [r.step_id for r in sub.poll()] == list(range(10))
    assert sub.poll() == []
    for i in range(10, 50):
        buf.append(step(i))
    got = sub.poll()
    assert [r.step_id for r in got] == list(range(34, 50))
    assert sub.dropped == 24


def test_export_writes_three_csvs_with_iso_times(tmp_path) -> None:
    records = [
        EngineEvent(1_700_000_000.0, "start", "engine ready", {"load_seconds": 1.5}),
        step(0),
        step(1),
        RequestRecord(
            "req-0", 1_700_000_000.0, 1_700_000_000.2, 1_700_000_001.0, 5, 0, 7, 0, "stop"
        ),
    ]
    counts = export_session(records, tmp_path / "session")
    assert counts == {"steps.csv": 2, "requests.csv": 1, "events.csv": 1}
    with open(tmp_path / "session" / "requests.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["rid"] == "req-0" and rows[0]["completion_tokens"] == "7"
    first = dt.datetime.fromisoformat(rows[0]["first_token"])
    arrival = dt.datetime.fromisoformat(rows[0]["arrival"])
    assert (first - arrival).total_seconds() == 0.2
    with open(tmp_path / "session" / "steps.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:4] == ["step_id", "time", "kind", "batch_size"]


def test_ring_buffer_cursor_reads_only_new_records_and_counts_overwritten() -> None:
    from llmconsole.core.telemetry import EngineEvent, TelemetryBuffer

    ring = TelemetryBuffer(capacity=4)
    for i in range(10):
        ring.append(EngineEvent(float(i), "start", str(i)))
    records, cursor, dropped = ring.since(0)
    assert [r.message for r in records] == ["6", "7", "8", "9"] and (cursor, dropped) == (10, 6)
    records, cursor, dropped = ring.since(8)
    assert [r.message for r in records] == ["8", "9"] and dropped == 0
    assert ring.since(10) == ([], 10, 0)
    sub = ring.subscribe()
    assert len(sub.poll()) == 4 and sub.dropped == 6
    ring.append(EngineEvent(10.0, "export", "10"))
    assert [r.message for r in sub.poll()] == ["10"] and sub.poll() == []
