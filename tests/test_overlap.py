"""The overlap schedule: decode step N + 1 is launched before step N's tokens are read, its input
ids taken from the device. Users must see exactly what the plain schedule gives them: the same
tokens, stops, logprobs and errors, no lost request and no leaked page. On CPU nothing runs
asynchronously, but every piece of the pipeline still runs (`--overlap-schedule on`); the GPU
tests run it with CUDA graphs and FlashInfer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_utils import wait_idle, wait_until

from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.kv_cache import PageAllocator
from llmconsole.core.request import Request
from llmconsole.core.scheduler import Chunk, ScheduledBatch, Scheduler
from llmconsole.core.telemetry import StepRecord

PROMPTS = [
    "Tell me about the sea.",
    "2+2=",
    "Write a haiku about cats.",
    "What is Python?",
    "Hi",
    "List three colors:",
]


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, Engine]]:
    built = {mode: Engine(EngineConfig(overlap_schedule=mode)) for mode in ("on", "off")}
    yield built
    for eng in built.values():
        eng.shutdown()


def _run(engine: Engine, params: list[SamplingParams]) -> list[tuple]:
    handles = [engine.submit(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    results = [h.result() for h in handles]
    wait_idle(engine)
    engine.check_integrity()
    return [
        (r.token_ids, r.text, r.finish_reason, [(lp.token_id, lp.logprob) for lp in r.logprobs])
        for r in results
    ]


def test_overlap_gives_the_plain_schedule_tokens_stops_and_logprobs(
    engines: dict[str, Engine],
) -> None:
    """Mixed ends inside one running batch: lengths that end mid-pipeline, a stop string, EOS
    (no ignore_eos), seeded sampling and logprobs."""
    params = [
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0, stop=["\n"]),
        SamplingParams(max_tokens=30, temperature=0.8, seed=11, logprobs=2),
        SamplingParams(max_tokens=64, temperature=0),  # may end on EOS
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=25, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True),
    ]
    on, off = engines["on"], engines["off"]
    before = on.counters["steps_launched_ahead"]
    assert _run(on, params) == _run(off, params)
    assert on.counters["steps_launched_ahead"] - before >= 20, "decode steps must run ahead"
    assert off.counters["steps_launched_ahead"] == 0


def test_penalties_fall_back_to_the_plain_schedule_with_the_same_tokens(
    engines: dict[str, Engine],
) -> None:
    # A penalty samples from the output so far, so the token in flight must be known first.
    params = [SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3)] * len(PROMPTS)
    on = engines["on"]
    before = on.counters["steps_launched_ahead"]
    assert _run(on, params) == _run(engines["off"], params)
    assert on.counters["steps_launched_ahead"] == before


def test_abort_and_late_arrivals_during_overlapped_decode(engines: dict[str, Engine]) -> None:
    on = engines["on"]
    expected = engines["off"].generate(
        PROMPTS[:3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    )
    long = on.submit("Count to one thousand.", SamplingParams(max_tokens=500, ignore_eos=True))
    first = [on.submit(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
             for p in PROMPTS[:2]]  # fmt: skip
    assert wait_until(lambda: on.counters["steps_launched_ahead"] > 0, 60)
    late = on.submit(PROMPTS[2], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    got = [h.result().token_ids for h in [*first, late]]
    long.abort()
    assert long.result().finish_reason == "abort"
    assert got == [r.token_ids for r in expected]
    wait_idle(on)
    on.check_integrity()


def test_retraction_under_overlap_loses_nothing() -> None:
    """A pool too small for every request: the lookahead stops when pages run short and the
    plain schedule retracts; outputs equal the one-at-a-time ones."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    with Engine(EngineConfig(overlap_schedule="on", max_total_tokens=160)) as small:
        handles = [small.submit(p, params) for p in PROMPTS]
        got = [h.result() for h in handles]
        wait_idle(small)
        small.check_integrity()
        alone = [small.generate([p], params)[0].token_ids for p in PROMPTS]
        ahead = small.counters["steps_launched_ahead"]
    assert [r.token_ids for r in got] == alone
    assert sum(r.finish_reason == "length" for r in got) == len(PROMPTS)
    assert ahead > 0


def test_a_fault_in_one_request_finishes_only_that_one(engines: dict[str, Engine]) -> None:
    on = engines["on"]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    expected = [r.token_ids for r in engines["off"].generate(PROMPTS[:3], params)]

    def hook(req: Request) -> None:
        if req.rid == "victim" and len(req.output_ids) == 5:
            raise RuntimeError("injected fault")

    on.fault_hook = hook
    try:
        handles = [on.submit(p, params) for p in PROMPTS[:3]]
        bad = on.submit(PROMPTS[3], params, rid="victim")
        got = [h.result().token_ids for h in handles]
        bad_result = bad.result()
    finally:
        on.fault_hook = None
    assert got == expected
    assert bad_result.finish_reason == "error" and "injected fault" in bad_result.error
    assert len(bad_result.token_ids) == 5
    wait_idle(on)
    on.check_integrity()


def test_overlap_schedule_is_a_live_flag(engines: dict[str, Engine]) -> None:
    on = engines["on"]
    result = on.restart({"overlap_schedule": "off"})
    assert result.mode == "live" and on.config.overlap_schedule == "off"
    before = on.counters["steps_launched_ahead"]
    on.generate(PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert on.counters["steps_launched_ahead"] == before
    on.restart({"overlap_schedule": "on"})
    on.generate(PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert on.counters["steps_launched_ahead"] > before


def test_auto_means_on_with_cuda_only() -> None:
    assert EngineConfig().resolve("cpu").overlap_schedule == "off"
    assert EngineConfig().resolve("cuda", 80).overlap_schedule == "on"
    assert EngineConfig(overlap_schedule="on").resolve("cpu").overlap_schedule == "on"
    with pytest.raises(ValueError, match="--overlap-schedule must be one of auto, on, off"):
        EngineConfig(overlap_schedule="yes")


# ---- the policy itself ------------------------------------------------------------------------


def _decoding(scheduler: Scheduler, rid: str, prompt: int, out: int, max_new: int) -> Request:
    req = Request(rid, list(range(1, prompt + 1)), SamplingParams(), max_new)
    scheduler.add(req)
    scheduler.waiting.remove(req)
    scheduler.running.append(req)
    req.output_ids = [7] * out
    req.num_computed = req.num_tokens - 1
    assert scheduler.reserve(req, req.num_tokens)
    return req


def test_schedule_ahead_moves_each_request_one_position_on() -> None:
    sched = Scheduler(
        PageAllocator(64), page_size=4, max_running_requests=8, chunked_prefill_size=64
    )
    a = _decoding(sched, "a", 5, 2, 10)  # 7 tokens: pages for 8 positions
    b = _decoding(sched, "b", 3, 9, 10)  # its step now samples output 10 of 10: it ends there
    c = _decoding(sched, "c", 7, 1, 10)  # 8 tokens, next position 8 needs a third page
    batch = sched.schedule()
    assert batch is not None and batch.kind == "decode"
    ahead = sched.schedule_ahead(batch)
    assert ahead is not None
    assert [(ch.req.rid, ch.start, ch.end, ch.ahead, ch.samples) for ch in ahead.chunks] == [
        ("a", 7, 8, True, True),
        ("c", 8, 9, True, True),
    ]
    assert len(c.pages) == 3 and len(a.pages) == 2
    assert b.pages and len(b.pages) == 3  # untouched: b leaves the batch
    # Anything queued goes first: no lookahead, the plain schedule admits it.
    sched.add(Request("d", [1, 2, 3], SamplingParams(), 4))
    assert sched.schedule_ahead(batch) is None
    sched.allocator.check_integrity(r.pages for r in sched.requests())


def test_schedule_ahead_refuses_when_pages_run_short() -> None:
    sched = Scheduler(
        PageAllocator(4), page_size=2, max_running_requests=8, chunked_prefill_size=64
    )
    _decoding(sched, "a", 3, 1, 10)  # 4 tokens in 2 pages; position 4 needs a third
    _decoding(sched, "b", 1, 1, 10)  # 2 tokens, 1 page; the pool (3 usable) is now full
    batch = ScheduledBatch(
        "decode", tuple(Chunk(r, r.num_computed, r.num_tokens) for r in sched.running)
    )
    assert sched.schedule_ahead(batch) is None


# ---- on the GPU: CUDA graphs, eager batches above the largest bucket, both GPU backends ------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_gpu_overlap_gives_the_plain_schedule_tokens(tiny_bf16_llama: Path, backend: str) -> None:
    """12 requests with --cuda-graph-max-bs 8: eager steps (input ids from the device) until
    enough have ended, then graph replays; requests end at different lengths, so later steps
    pick their input ids out of the step before. Same kernels, same batches: the same tokens
    and logprobs as the plain schedule, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 300, (12,), generator=gen)]  # fmt: skip
    params = [
        SamplingParams(max_tokens=4 + 2 * i, temperature=0, ignore_eos=True, logprobs=2)
        for i in range(12)
    ]
    params[5] = SamplingParams(max_tokens=20, temperature=0.7, seed=9, ignore_eos=True)
    results, records = {}, {}
    for mode in ("off", "on"):
        config = EngineConfig(
            model=str(tiny_bf16_llama),
            device="cuda",
            dtype="bfloat16",
            max_total_tokens=16384,
            attention_backend=backend,
            cuda_graph_max_bs=8,
            overlap_schedule=mode,
        )
        with Engine(config) as eng:
            sub = eng.subscribe()
            handles = [eng.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
            results[mode] = [
                (r.token_ids, [lp.logprob for lp in r.logprobs])
                for r in (h.result() for h in handles)
            ]
            wait_idle(eng)
            eng.check_integrity()
            records[mode] = [r for r in sub.poll() if isinstance(r, StepRecord)]
            ahead = eng.counters["steps_launched_ahead"]
        assert (ahead > 0) == (mode == "on")
    assert results["on"] == results["off"]
    decode = [r for r in records["on"] if r.kind == "decode"]
    assert any(r.cuda_graph for r in decode) and any(not r.cuda_graph for r in decode)
