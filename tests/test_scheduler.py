"""The batching policy on its own: no model, tokens are simulated."""

from __future__ import annotations

import itertools

from llmconsole.core.kv_cache import PageAllocator
from llmconsole.core.request import Request
from llmconsole.core.sampling_params import SamplingParams
from llmconsole.core.scheduler import ScheduledBatch, Scheduler

_clock = itertools.count()


def make_request(prompt_len: int, max_new: int, rid: str | None = None) -> Request:
    t = next(_clock)
    return Request(rid or f"r{t}", list(range(1, prompt_len + 1)), SamplingParams(), max_new, t)


def run_step(sched: Scheduler, batch: ScheduledBatch, finished: list[Request]) -> None:
    """What the engine does after a forward pass: advance, append a token, finish at length."""
    for chunk in batch.chunks:
        chunk.req.num_computed = chunk.end
        if chunk.samples:
            chunk.req.output_ids.append(7)
            if len(chunk.req.output_ids) >= chunk.req.max_new_tokens:
                sched.finish(chunk.req)
                finished.append(chunk.req)


def drain(sched: Scheduler, limit: int = 10_000) -> tuple[list[Request], list[ScheduledBatch]]:
    finished: list[Request] = []
    batches: list[ScheduledBatch] = []
    for _ in range(limit):
        batch = sched.schedule()
        if batch is None:
            break
        batches.append(batch)
        run_step(sched, batch, finished)
        sched.check_integrity()
    return finished, batches


def test_prefill_first_then_decode_and_all_pages_return() -> None:
    sched = Scheduler(
        PageAllocator(101), page_size=1, max_running_requests=8, chunked_prefill_size=64
    )
    reqs = [make_request(10, 5) for _ in range(3)]
    for r in reqs:
        sched.add(r)
    first = sched.schedule()
    assert first is not None and first.kind == "prefill" and first.batch_size == 3
    run_step(sched, first, [])
    second = sched.schedule()
    assert second is not None and second.kind == "decode" and second.batch_size == 3
    run_step(sched, second, [])
    finished, _ = drain(sched)
    assert {r.rid for r in finished} == {r.rid for r in reqs}
    assert all(len(r.output_ids) == 5 for r in reqs)
    assert sched.allocator.num_used == 0


def test_max_running_requests_caps_admission() -> None:
    sched = Scheduler(
        PageAllocator(1001), page_size=1, max_running_requests=2, chunked_prefill_size=-1
    )
    for _ in range(5):
        sched.add(make_request(4, 3))
    _, batches = drain(sched)
    assert max(b.batch_size for b in batches) == 2
    assert max(len(b.chunks) for b in batches if b.kind == "decode") <= 2


def test_chunked_prefill_splits_a_long_prompt() -> None:
    sched = Scheduler(
        PageAllocator(1001), page_size=4, max_running_requests=8, chunked_prefill_size=16
    )
    req = make_request(40, 2)
    sched.add(req)
    _, batches = drain(sched)
    prefills = [b for b in batches if b.kind == "prefill"]
    assert [(c.start, c.end) for b in prefills for c in b.chunks] == [(0, 16), (16, 32), (32, 40)]
    assert [c.samples for b in prefills for c in b.chunks] == [False, False, True]
    assert len(req.output_ids) == 2


def test_out_of_pages_retracts_the_newest_and_loses_nothing() -> None:
    # 40 usable slots; four requests of 8 prompt + 8 output tokens need 64: retraction must happen.
    sched = Scheduler(
        PageAllocator(41), page_size=1, max_running_requests=8, chunked_prefill_size=-1
    )
    reqs = [make_request(8, 8) for _ in range(4)]
    for r in reqs:
        sched.add(r)
    finished, batches = drain(sched)
    retracted = [r for b in batches for r in b.retracted]
    assert retracted, "the pool was too small, something had to be retracted"
    assert {r.rid for r in finished} == {r.rid for r in reqs}
    assert all(len(r.output_ids) == 8 for r in reqs)
    # The newest request is the first victim.
    assert retracted[0] is max(reqs, key=lambda r: r.arrival_time)
    # A retracted request is re-prefilled with the tokens it had generated.
    victim = retracted[0]
    assert victim.num_retractions >= 1
    assert sched.allocator.num_used == 0


def test_a_request_that_needs_the_whole_pool_still_runs() -> None:
    sched = Scheduler(
        PageAllocator(17), page_size=2, max_running_requests=4, chunked_prefill_size=4
    )
    big = make_request(20, 12)  # 32 tokens = all 16 pages
    small = make_request(3, 3)
    sched.add(big)
    sched.add(small)
    finished, _ = drain(sched)
    assert {r.rid for r in finished} == {big.rid, small.rid}
    assert sched.allocator.num_used == 0


def test_finish_while_queued_frees_nothing_twice() -> None:
    sched = Scheduler(
        PageAllocator(11), page_size=1, max_running_requests=1, chunked_prefill_size=-1
    )
    a, b = make_request(3, 5), make_request(3, 5)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None
    run_step(sched, batch, [])
    sched.finish(b)  # aborted while still queued
    sched.finish(a)  # aborted while running
    sched.check_integrity()
    assert sched.allocator.num_used == 0 and not sched.has_work()
