"""The radix prefix cache on its own, then under the scheduler (no model: tokens simulated)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from engine_utils import wait_idle
from test_scheduler import drain, make_request, run_step

from llmconsole.core import Engine, EngineConfig
from llmconsole.core.engine import EngineStoppedError
from llmconsole.core.kv_cache import PageAllocator
from llmconsole.core.prefix_cache import PrefixCache
from llmconsole.core.request import Request
from llmconsole.core.sampling_params import SamplingParams
from llmconsole.core.scheduler import SHARE_MIN_TOKENS, DraftKV, Scheduler
from llmconsole.core.telemetry import RequestRecord, StepRecord, of_type


def cache_of(num_pages: int, page_size: int) -> tuple[PageAllocator, PrefixCache]:
    alloc = PageAllocator(num_pages)
    return alloc, PrefixCache(alloc, page_size)


def test_a_match_returns_the_cached_pages_in_whole_pages_only() -> None:
    alloc, cache = cache_of(32, page_size=2)
    pages = alloc.alloc(4)
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], pages)
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9])[0] == pages
    assert cache.match([1, 2, 3, 4, 5, 9])[0] == pages[:2]  # page 3 differs
    assert cache.match([1, 2, 3, 4, 5])[0] == pages[:2]  # 5 alone is half a page
    assert cache.match([1, 2, 3, 9])[0] == pages[:1]  # never half a page
    assert cache.match([9, 2, 3, 4])[0] == []
    assert cache.num_pages == 4 and alloc.num_used == 4
    cache.check_integrity()
    alloc.check_integrity(cache.owned_pages())


def test_insert_frees_the_callers_copies_of_what_is_cached_and_keeps_the_rest() -> None:
    alloc, cache = cache_of(32, page_size=1)
    first = alloc.alloc(5)
    cache.insert([1, 2, 3, 4, 5], first)
    second = alloc.alloc(6)  # computed the same 1, 2, 3 again, then 8, 9, 10
    cache.insert([1, 2, 3, 8, 9, 10], second)
    assert alloc.num_used == 5 + 3  # the second's first three pages went back
    assert cache.num_pages == 8
    assert cache.match([1, 2, 3, 8, 9, 10, 11])[0] == first[:3] + second[3:]
    assert cache.match([1, 2, 3, 4, 5])[0] == first
    cache.check_integrity()
    alloc.check_integrity(cache.owned_pages())


def test_locked_prefixes_are_never_evicted_and_lru_goes_first() -> None:
    alloc, cache = cache_of(32, page_size=1)
    old, new, held = alloc.alloc(3), alloc.alloc(3), alloc.alloc(3)
    cache.insert([1, 1, 1], old)
    cache.insert([2, 2, 2], new)
    cache.insert([3, 3, 3], held)
    _, node = cache.match([3, 3, 3])
    cache.lock(node)
    cache.match([1, 1, 1])  # now more recent than [2, 2, 2]
    assert cache.evictable_pages == 6
    assert cache.evict(2) == 3  # a whole leaf: [2, 2, 2]
    assert cache.match([2, 2, 2])[0] == [] and cache.match([1, 1, 1])[0] == old
    assert cache.flush() == 3  # [1, 1, 1]; the locked one stays
    assert cache.match([3, 3, 3])[0] == held and cache.evictable_pages == 0
    cache.unlock(node)
    assert cache.flush() == 3 and alloc.num_used == 0
    with pytest.raises(RuntimeError, match="unlocked more often"):
        cache.unlock(node)


def test_a_split_keeps_a_lock_on_both_halves() -> None:
    alloc, cache = cache_of(32, page_size=1)
    cache.insert([1, 2, 3, 4], alloc.alloc(4))
    _, node = cache.match([1, 2, 3, 4])
    cache.lock(node)
    cache.insert([1, 2, 9], alloc.alloc(3))  # splits [1, 2, 3, 4] after 1, 2
    cache.check_integrity()
    assert cache.flush() == 1  # only the new [9]: [1, 2] and [3, 4] are read by the lock
    cache.unlock(node)
    assert cache.flush() == 4 and alloc.num_used == 0


def test_bad_inserts_are_refused() -> None:
    alloc, cache = cache_of(8, page_size=2)
    with pytest.raises(ValueError, match="2 pages need 4 tokens"):
        cache.insert([1, 2, 3], alloc.alloc(2))


# ---- under the scheduler -----------------------------------------------------------------------


def cached_scheduler(num_pages: int = 1001, page_size: int = 1, budget: int = 256) -> Scheduler:
    alloc = PageAllocator(num_pages)
    return Scheduler(alloc, page_size, 16, budget, PrefixCache(alloc, page_size))


def chat(system: int, body: list[int], max_new: int = 3) -> Request:
    """A prompt of a 24-token shared 'system prompt' then its own tokens."""
    prompt = [system] * 24 + body
    return Request(f"r{id(body)}", prompt, SamplingParams(), max_new)


def test_a_request_after_a_finished_one_starts_past_their_common_prefix() -> None:
    sched = cached_scheduler()
    first = chat(5, [1, 2, 3])
    sched.add(first)
    finished, _ = drain(sched)
    assert finished == [first] and sched.pages_in_use == 0 and sched.pages_cached == 29
    second = chat(5, [1, 2, 4, 5])
    sched.add(second)
    batch = sched.schedule()
    assert batch is not None and batch.kind == "prefill"
    (chunk,) = batch.chunks
    assert (chunk.start, chunk.cached, chunk.end) == (26, 26, 28)
    assert second.num_cached_tokens == 26 and second.num_shared_pages == 26
    sched.check_integrity()
    run_step(sched, batch, [])
    drain(sched)
    assert sched.pages_in_use == 0
    assert sched.flush_cache() == 29 + 4  # the first's 29, the second's own 4
    assert sched.allocator.num_used == 0 and sched.pages_cached == 0
    sched.check_integrity()


def test_a_full_hit_still_computes_the_last_prompt_token() -> None:
    sched = cached_scheduler()
    sched.add(chat(5, [1, 2]))
    drain(sched)
    again = chat(5, [1, 2])
    sched.add(again)
    batch = sched.schedule()
    assert batch is not None and batch.chunks[0].start == 25 and batch.chunks[0].end == 26
    assert batch.chunks[0].samples


def test_requests_sharing_a_prefix_in_one_step_compute_it_once() -> None:
    sched = cached_scheduler()
    reqs = [chat(5, [i, i + 1]) for i in range(1, 5)] + [chat(6, [9])]
    for r in reqs:
        sched.add(r)
    step1 = sched.schedule()
    assert step1 is not None
    # The first request computes the shared 24 tokens; the others that share them wait one
    # step; the one with another system prompt is admitted at once.
    assert [c.req for c in step1.chunks] == [reqs[0], reqs[4]]
    run_step(sched, step1, [])
    step2 = sched.schedule()
    assert step2 is not None and step2.kind == "prefill"
    assert [c.req for c in step2.chunks] == reqs[1:4]
    assert all(c.start == c.cached == 24 for c in step2.chunks)
    # The first request still runs and reads its prompt from the cache now, locked.
    assert reqs[0].num_shared_pages == 26 and sched.pages_cached == 26 + 25
    sched.check_integrity()
    run_step(sched, step2, [])
    finished, _ = drain(sched)
    assert len(finished) == 5 and sched.pages_in_use == 0
    sched.flush_cache()
    assert sched.allocator.num_used == 0


def test_short_shared_prefixes_are_not_worth_a_step() -> None:
    sched = cached_scheduler()
    short = SHARE_MIN_TOKENS - 1
    reqs = [Request(f"s{i}", [3] * short + [i] * 10, SamplingParams(), 2) for i in range(3)]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()
    assert batch is not None and batch.batch_size == 3


def test_cached_pages_are_evicted_when_the_pool_runs_short() -> None:
    sched = cached_scheduler(num_pages=41)  # 40 usable pages
    for body in ([1], [2], [3]):
        sched.add(chat(5, body, max_new=2))
        drain(sched)
    assert sched.pages_cached == 24 + 3 * 2 and sched.allocator.num_free == 10
    big = Request("big", list(range(100, 135)), SamplingParams(), 2)  # 35 + 1 pages
    sched.add(big)
    finished, _ = drain(sched)
    assert finished == [big] and big.num_retractions == 0
    sched.check_integrity()


def test_a_retracted_request_resumes_from_its_cached_kv() -> None:
    sched = cached_scheduler()
    a = Request("a", list(range(1, 21)), SamplingParams(), 30)
    b = Request("b", list(range(101, 121)), SamplingParams(), 30)
    sched.add(a)
    sched.add(b)
    for _ in range(4):  # prefill, then 3 decode steps
        batch = sched.schedule()
        assert batch is not None
        run_step(sched, batch, [])
    assert b.num_computed == 23 and len(b.output_ids) == 4
    assert sched.set_limits(1, 256) == [b]  # b, the newest, goes back to the queue
    assert b.num_computed == 0 and not b.pages
    sched.check_integrity()
    finished, batches = drain(sched)
    assert [r.rid for r in finished] == ["a", "b"]
    (resume,) = [c for batch in batches for c in batch.chunks if c.req is b and c.cached]
    assert (resume.start, resume.end) == (23, 24)  # its 23 computed tokens, then on
    assert b.num_cached_tokens == 0  # usage counts the first admission's hits only
    sched.check_integrity()


@pytest.mark.parametrize(
    ("draft_kv", "page_size", "start"),
    [
        (DraftKV.TOKENS, 1, 21),  # a draft model: its KV at i depends on tokens [0, i]
        (DraftKV.NEXT_TOKEN, 1, 20),  # an EAGLE head: on token i + 1 too, one page back
        (DraftKV.NEXT_TOKEN, 4, 16),  # pages of four: 5 cached (20 tokens), one back
    ],
)
def test_a_drafter_s_kv_is_cached_only_where_it_was_computed(
    draft_kv: DraftKV, page_size: int, start: int
) -> None:
    """A speculative drafter keeps its KV in the request's pages: a finished request caches
    only the pages whose drafter KV was final too (its draft_computed, here 21 of its 30
    computed positions), and a request that matches them starts its drafter there. An EAGLE
    head's KV at a position also saw the token after it, so the prefix's last page is computed
    again, past which the cached head KV saw the same tokens as the new request."""
    sched = cached_scheduler(page_size=page_size)
    sched.draft_kv = draft_kv
    first = chat(5, [1, 2, 3, 4, 5, 6], max_new=2)  # 30 prompt tokens
    sched.add(first)
    batch = sched.schedule()
    assert batch is not None and first.draft_computed == 0  # nothing cached yet
    run_step(sched, batch, [])
    first.draft_computed = 21  # the drafter trails the target
    finished, _ = drain(sched)
    assert finished == [first]
    assert sched.pages_cached == 21 // page_size  # not the 31 computed positions' pages
    second = chat(5, [1, 2, 3, 4, 5, 9, 9, 9])
    sched.add(second)
    batch = sched.schedule()
    assert batch is not None
    (chunk,) = batch.chunks
    assert chunk.cached == chunk.start == start
    assert second.draft_computed == start and second.num_shared_pages == start // page_size
    sched.check_integrity()
    run_step(sched, batch, [])
    drain(sched)
    assert sched.pages_in_use == 0
    sched.check_integrity()


def test_without_a_cache_nothing_changes() -> None:
    sched = Scheduler(PageAllocator(101), 1, 8, 64)
    for _ in range(2):
        sched.add(make_request(30, 3))
    finished, batches = drain(sched)
    assert len(finished) == 2 and batches[0].batch_size == 2
    assert sched.allocator.num_used == 0 and sched.flush_cache() == 0


# ---- in the engine (the default model) -----------------------------------------------------------

QUESTIONS = [
    "Name three colors of the rainbow.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "What is two plus two?",
]


@pytest.fixture(scope="module")
def uncached() -> Iterator[Engine]:
    eng = Engine(EngineConfig(disable_radix_cache=True))
    yield eng
    eng.shutdown()


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def test_cached_prefixes_give_the_tokens_computing_them_gives(
    engine: Engine, uncached: Engine
) -> None:
    engine.flush_cache()
    prompts = [engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    system = 24  # SmolLM2's template: its system prompt and the user turn's header
    assert all(p[:system] == prompts[0][:system] for p in prompts)
    expected = [r.token_ids for r in uncached.generate(prompts, greedy(16))]
    assert all(r.usage.cached_tokens == 0 for r in uncached.generate(prompts[:2], greedy(2)))

    together = engine.generate(prompts, greedy(16))  # the template is computed once
    assert [r.token_ids for r in together] == expected
    cached = [r.usage.cached_tokens for r in together]
    assert cached[0] == 0 and all(c >= system for c in cached[1:]), cached

    again = engine.generate(prompts[:3], greedy(16))  # whole prompts, all but the last token
    assert [r.token_ids for r in again] == expected[:3]
    assert [r.usage.cached_tokens for r in again] == [len(p) - 1 for p in prompts[:3]]

    # A later turn of a chat reads the earlier turn, answer included, from the cache.
    turn = engine.apply_chat_template(
        [
            {"role": "user", "content": QUESTIONS[0]},
            {"role": "assistant", "content": engine.tokenizer.decode(together[0].token_ids)},
            {"role": "user", "content": "And two more?"},
        ]
    )
    follow = engine.generate([turn], greedy(8))[0]
    assert follow.usage.cached_tokens > len(prompts[0])
    assert follow.token_ids == uncached.generate([turn], greedy(8))[0].token_ids

    wait_idle(engine)
    engine.check_integrity()
    stats = engine.stats()
    assert stats["kv_pages_used"] == 0 and stats["kv_pages_cached"] > 0
    assert engine.flush_cache() == stats["kv_pages_cached"]
    assert engine.stats()["kv_pages_cached"] == 0
    engine.check_integrity()


def test_prompt_logprobs_are_computed_not_read_from_the_cache(
    engine: Engine, uncached: Engine
) -> None:
    prompt = engine.apply_chat_template([{"role": "user", "content": QUESTIONS[1]}])
    engine.generate([prompt], greedy(4))  # now cached
    params = greedy(2, prompt_logprobs=0)
    want = uncached.generate([prompt], params)[0]
    got = engine.generate([prompt], params)[0]
    assert got.usage.cached_tokens == 0
    assert len(got.prompt_logprobs) == len(prompt) - 1
    for a, b in zip(got.prompt_logprobs, want.prompt_logprobs, strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-3)


@pytest.mark.parametrize(
    "flags",
    [{}, {"page_size": 4, "chunked_prefill_size": 7}],
    ids=["page1", "page4-chunk7"],
)
def test_a_tiny_pool_evicts_and_retracts_without_losing_a_request(
    uncached: Engine, flags: dict
) -> None:
    """Cached prefixes under eviction, retraction and (with chunks of 7) prefills that stop
    mid-prompt, whose computed pages the cache takes while they go on."""
    prompts = [uncached.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    expected = [r.token_ids for r in uncached.generate(prompts, greedy(40))]
    with Engine(EngineConfig(max_total_tokens=160, max_running_requests=8, **flags)) as small:
        assert small.config.prefix_cache
        first = small.generate(prompts, greedy(40))
        second = small.generate(prompts[::-1], greedy(40))
        assert [r.token_ids for r in first] == expected
        assert [r.token_ids for r in second] == expected[::-1]
        assert all(not r.error for r in first + second)
        records = small.telemetry.snapshot()
        assert sum(s.retracted for s in of_type(records, StepRecord)) > 0
        assert sum(r.cached_tokens for r in of_type(records, RequestRecord)) > 0
        wait_idle(small)
        small.check_integrity()
        small.flush_cache()
        assert small.allocator.num_used == 0
    with pytest.raises(EngineStoppedError, match="shut down"):
        small.flush_cache()
