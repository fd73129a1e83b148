from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

from engine_utils import wait_idle
from test_scheduler import drain, run_step

from llmconsole.core import Engine, SamplingParams
from llmconsole.core.kv_cache import PageAllocator
from llmconsole.core.prefix_cache import PrefixCache
from llmconsole.core.request import Request
from llmconsole.core.scheduler import Scheduler
from llmconsole.core.step_results import admission_tokens
from llmconsole.core.telemetry import (
    EngineEvent,
    RequestRecord,
    StepRecord,
    TelemetryBuffer,
    export_session,
    of_type,
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


def test_steps_record_prefix_cache_hits_and_reclaimable_pages(
    engine: Engine, tmp_path: Path
) -> None:
    """Two requests with a long shared prefix, one after the other, on the real default model:
    the second's admission step reads the prefix from the cache, and once the first finishes its
    pages stay in the cache as reclaimable; steps.csv carries both figures."""
    engine.flush_cache()
    wait_idle(engine)
    prefix = engine.tokenizer.encode("You answer every question in one short sentence. " * 6)
    first = prefix + engine.tokenizer.encode("What is two plus two?")
    second = prefix + engine.tokenizer.encode("Name a colour.")
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    sub = engine.subscribe()
    sub.poll()
    engine.generate([first], params)
    engine.generate([second], params)
    wait_idle(engine)
    records = sub.poll()
    steps = of_type(records, StepRecord)
    finished = of_type(records, RequestRecord)
    assert [r.cached_tokens for r in finished] == [0, finished[1].cached_tokens]
    assert finished[1].cached_tokens >= len(prefix) - engine.config.page_size

    admissions = [s for s in steps if s.admitted_tokens]
    assert [(s.cached_tokens, s.admitted_tokens) for s in admissions] == [
        (0, len(first)),
        (finished[1].cached_tokens, len(second)),
    ]
    assert sum(s.cached_tokens for s in steps) == finished[1].cached_tokens
    # After the first finishes, nothing runs and its KV is all the cache's, reclaimable.
    before_second = [s for s in steps if s.time <= admissions[1].time][:-1]
    assert before_second[-1].kv_pages_used == 0 and before_second[-1].kv_pages_cached > 0
    # While the second runs, the prefix pages it reads count as in use, not as reclaimable.
    page = engine.config.page_size
    shared = finished[1].cached_tokens // page
    assert admissions[1].kv_pages_used == -(-len(second) // page)
    assert admissions[1].kv_pages_cached == before_second[-1].kv_pages_cached - shared

    export_session(records, tmp_path)
    with open(tmp_path / "steps.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_id = {s.step_id: s for s in steps}
    assert len(rows) == len(steps)
    for row in rows:
        step = by_id[int(row["step_id"])]
        assert int(row["cached_tokens"]) == step.cached_tokens
        assert int(row["admitted_tokens"]) == step.admitted_tokens
        assert int(row["kv_pages_cached"]) == step.kv_pages_cached
    assert any(int(r["cached_tokens"]) > 0 for r in rows)
    assert any(int(r["kv_pages_cached"]) > 0 and int(r["kv_pages_used"]) == 0 for r in rows)


def test_admission_tokens_count_each_request_once_at_admission_even_when_chunked() -> None:
    """The hit rate's numerator and denominator per step (no model: tokens simulated), read
    after the step's tokens are in, as the engine does."""
    alloc = PageAllocator(1001)
    sched = Scheduler(alloc, 1, 16, 8, PrefixCache(alloc, 1))  # prefill budget: 8 tokens

    def request(body: list[int]) -> Request:
        return Request(f"r{len(body)}", [5] * 24 + body, SamplingParams(), 3)

    first = request([1, 2, 3])
    sched.add(first)
    seen = []
    for _ in range(100):
        batch = sched.schedule()
        if batch is None:
            break
        run_step(sched, batch, [])
        seen.append((batch.kind, admission_tokens(batch)))
    # 27 prompt tokens in chunks of 8: the first chunk admits it, the rest and decode add nothing
    assert seen[0] == ("prefill", (0, 27)) and all(a == (0, 0) for _, a in seen[1:])

    second = request([1, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14])  # 36 tokens, 26 of them cached
    sched.add(second)
    batch = sched.schedule()
    assert batch is not None
    run_step(sched, batch, [])
    assert admission_tokens(batch) == (26, 36) and second.num_cached_tokens == 26
    _, rest = drain(sched)
    assert rest and all(admission_tokens(b) == (0, 0) for b in rest)

    third = request([1, 2])  # all but its last token cached: the step samples it at once
    sched.add(third)
    batch = sched.schedule()
    assert batch is not None
    run_step(sched, batch, [])
    assert admission_tokens(batch) == (25, 26) and third.num_tokens == 27
