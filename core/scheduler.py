"""Continuous batching policy: FCFS admission, chunked prefill, decode, retract-and-requeue.

Pure policy over `Request` objects and a `PageAllocator`: no model, no tensors, so it is tested
on its own. Like SGLang, a step is either a prefill batch (new or chunked requests, prefill has
priority) or a decode batch (every running request that has finished its prefill). With a
`PrefixCache`, an admitted request starts after the longest cached prefix of its tokens, finished
requests leave their KV in the cache, and the cache's unlocked pages count as free: they are
evicted (least recently used first) when pages run short. A speculative drafter with KV of its
own (`DraftKV`) keeps it in the same pages, so a cached prefix holds the drafter's KV too.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .kv_cache import PageAllocator, pages_needed
from .prefix_cache import PrefixCache
from .request import Request, RequestState

# A queued request that shares at least this many uncached tokens with one admitted in the same
# step waits one step, then reads that prefix from the cache instead of computing it again. A
# chat template's system prompt, the common case, is ~20-30 tokens (SmolLM2's 24, Llama 3.1's
# ~25), so SGLang's 32 would miss it; deferring costs the request one (smaller) prefill step.
SHARE_MIN_TOKENS = 16


class DraftKV(enum.Enum):
    """What the speculative drafter keeps in a request's pages besides the target's KV. Its KV
    is indexed by the target's slots, so a cached prefix's pages carry it as well, but only
    where it was computed: `Request.draft_computed` positions."""

    NONE = "none"  # no drafter KV: no speculation, or n-gram lookup
    # A draft model: its KV at position i depends on tokens [0, i] only, like the target's.
    TOKENS = "tokens"
    # An EAGLE head: position i holds token i + 1 with the target's features at i, so its KV
    # there also depends on the token after. A request that matched a prefix leaves that
    # prefix's last page to compute: the head's KV before it then saw the same next token.
    NEXT_TOKEN = "next_token"


@dataclass(frozen=True)
class Chunk:
    """Process the tokens [start, end) of `req`; sample a new token when that reaches its end.
    `ahead`: scheduled while the step that samples the token at `start` is still in flight
    (overlap schedule), so that token is not in `req` yet and comes from the device.
    `cached`: on the request's first step after admission, the positions [0, cached) it found
    in the prefix cache (start == cached); the step writes their slots into its slot-table row."""

    req: Request
    start: int
    end: int
    ahead: bool = False
    cached: int = 0
    samples: bool = field(init=False)  # fixed when scheduled; the request grows afterwards

    def __post_init__(self) -> None:
        known = self.req.num_tokens + self.ahead
        assert 0 <= self.start < self.end <= known
        object.__setattr__(self, "samples", self.end == known)

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ScheduledBatch:
    kind: str  # "prefill" | "decode"
    chunks: tuple[Chunk, ...]
    retracted: tuple[Request, ...] = ()

    def __post_init__(self) -> None:
        assert self.chunks, "a scheduled batch is never empty"

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def batch_size(self) -> int:
        return len(self.chunks)


class Scheduler:
    """Contract: every request handed to `add` ends in exactly one of `finish` or `abort`; a
    retracted request keeps its output and goes back to the head of the queue, so none is lost."""

    def __init__(
        self,
        allocator: PageAllocator,
        page_size: int,
        max_running_requests: int,
        chunked_prefill_size: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.allocator = allocator
        self.prefix_cache = prefix_cache
        self.page_size = page_size
        self.max_running_requests = max_running_requests
        self.prefill_budget = _prefill_budget(chunked_prefill_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._prefilled: list[Request] = []  # the last prefill step's requests, to share
        self.draft_kv = DraftKV.NONE  # set by the engine with its speculator

    # ---- bookkeeping -----------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_usable * self.page_size

    @property
    def pages_in_use(self) -> int:
        """Pages running requests hold (their own and the cached prefixes they read); the
        cache's other pages are reclaimable, so they count as free."""
        cache = self.prefix_cache
        return self.allocator.num_used - (cache.evictable_pages if cache is not None else 0)

    @property
    def pages_cached(self) -> int:
        """Pages the prefix cache holds, the ones running requests read included."""
        return self.prefix_cache.num_pages if self.prefix_cache is not None else 0

    @property
    def pages_reclaimable(self) -> int:
        """The prefix cache's pages that no running request reads: `pages_in_use` leaves them
        out, so the two add up to the pages allocated."""
        return self.prefix_cache.evictable_pages if self.prefix_cache is not None else 0

    def start_prefix_cache(self) -> None:
        """Cache from now on (a hot restart turned the cache on over the same pool)."""
        if self.prefix_cache is None:
            self.prefix_cache = PrefixCache(self.allocator, self.page_size)

    def stop_prefix_cache(self) -> None:
        """Undo `start_prefix_cache` while nothing has been cached yet (a failed restart)."""
        if self.prefix_cache is not None:
            assert self.prefix_cache.num_pages == 0, "stopping a prefix cache that holds pages"
            self.prefix_cache = None

    def flush_cache(self) -> int:
        """Free every cached page no running request reads; returns how many."""
        return self.prefix_cache.flush() if self.prefix_cache is not None else 0

    def add(self, req: Request) -> None:
        req.state = RequestState.WAITING
        self.waiting.append(req)

    def requests(self) -> Iterator[Request]:
        yield from self.running
        yield from self.waiting

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def finish(self, req: Request, cache: bool = True) -> None:
        """Drop a finished request from the running set and free its pages; with a prefix
        cache, the KV it computed stays there (`cache=False`: a request whose KV may be wrong,
        after a failed step, is not cached)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req, cache)
        req.state = RequestState.FINISHED

    def _release(self, req: Request, cache: bool) -> None:
        tree = self.prefix_cache
        own = req.pages[req.num_shared_pages :]
        full = self._cacheable_pages(req)
        if tree is not None and cache and full > req.num_shared_pages:
            tree.insert(req.token_ids(0, full * self.page_size), req.pages[:full])
            own = req.pages[full:]
        if req.prefix_node is not None:
            assert tree is not None
            tree.unlock(req.prefix_node)
        self.allocator.free(own)
        req.pages = []
        req.num_shared_pages = 0
        req.prefix_node = None
        req.num_computed = 0
        req.draft_computed = 0
        req.draft_features = None

    def _cacheable_pages(self, req: Request) -> int:
        """Leading pages of `req` whose every position holds final KV: the target's, and the
        drafter's when it keeps KV in them."""
        done = req.num_computed
        if self.draft_kv is not DraftKV.NONE:
            done = min(done, req.draft_computed)
        return done // self.page_size

    def _available(self) -> int:
        """Pages an allocation can get: free ones and the cache's evictable ones."""
        cache = self.prefix_cache
        return self.allocator.num_free + (cache.evictable_pages if cache is not None else 0)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Give `req` pages for its first `num_tokens` tokens, if the pool has them."""
        extra = pages_needed(num_tokens, self.page_size) - len(req.pages)
        if extra <= 0:
            return True
        if extra > self._available():
            return False
        short = extra - self.allocator.num_free
        if short > 0:
            assert self.prefix_cache is not None
            self.prefix_cache.evict(short)
        req.pages.extend(self.allocator.alloc(extra))
        return True

    def _match(self, req: Request) -> int:
        """Give a request being admitted the cached pages of its longest cached prefix (locked)
        and return that prefix's length; at least its last token is left to compute, whose
        logits it samples from. Requests that want prompt logprobs compute every position."""
        tree = self.prefix_cache
        if tree is None or req.params.prompt_logprobs is not None:
            return 0
        pages, node = tree.match(req.token_ids(0, req.num_tokens - 1))
        if pages and self.draft_kv is DraftKV.NEXT_TOKEN:  # see DraftKV
            pages, node = tree.match(req.token_ids(0, (len(pages) - 1) * self.page_size))
        if pages:
            tree.lock(node)
            req.prefix_node = node
            req.pages = pages
            req.num_shared_pages = len(pages)
        return len(pages) * self.page_size

    def _shares_with(self, req: Request, cached: int, admitted: list[Chunk]) -> bool:
        """Whether `req`'s next SHARE_MIN_TOKENS tokens past its cached prefix (whole pages,
        before its last token) are ones a request admitted in this step computes."""
        if self.prefix_cache is None or not admitted:
            return False
        span = pages_needed(SHARE_MIN_TOKENS, self.page_size) * self.page_size
        stop = cached + span
        if stop > req.num_tokens - 1:
            return False
        mine = req.token_ids(cached, stop)
        return any(c.end >= stop and c.req.token_ids(cached, stop) == mine for c in admitted)

    def _share(self, req: Request) -> None:
        """Put the KV a running request's prefill computed in the cache (SGLang's
        cache_unfinished_req), so requests admitted while it runs read it too; the request
        then reads those pages from the cache, under a lock. Skipped when the cache already
        holds more of its tokens than it reads from there (two requests computed the same
        tokens in one step): its own pages are cached when it finishes."""
        tree = self.prefix_cache
        full = self._cacheable_pages(req)
        if tree is None or req.state is not RequestState.RUNNING or full <= req.num_shared_pages:
            return
        tokens = req.token_ids(0, full * self.page_size)
        pages, _ = tree.match(tokens)
        if len(pages) != req.num_shared_pages:
            return
        node = tree.insert(tokens, req.pages[:full])
        tree.lock(node)
        if req.prefix_node is not None:
            tree.unlock(req.prefix_node)
        req.prefix_node, req.num_shared_pages = node, full

    def _unmatch(self, req: Request) -> None:
        """Undo `_match` for a request that stays in the queue."""
        if req.prefix_node is not None:
            assert self.prefix_cache is not None
            self.prefix_cache.unlock(req.prefix_node)
        req.pages, req.num_shared_pages, req.prefix_node = [], 0, None

    def reserve(self, req: Request, num_tokens: int) -> bool:
        """Pages for `req`'s first `num_tokens` positions (a verify pass writes its drafts'
        KV past the request's tokens); False, and nothing taken, when the pool is short."""
        return self._grow(req, num_tokens)

    def trim(self, req: Request) -> None:
        """Free the pages past what `req`'s tokens need (rejected drafts' pages)."""
        keep = pages_needed(req.num_tokens, self.page_size)
        if len(req.pages) > keep:
            self.allocator.free(req.pages[keep:])
            del req.pages[keep:]

    def _retract_newest(self) -> Request:
        victim = max(self.running, key=lambda r: r.arrival_time)
        self.running.remove(victim)
        self._release(victim, cache=True)  # its KV may still be there when it is readmitted
        victim.state = RequestState.WAITING
        victim.num_retractions += 1
        # Back to the head of the queue, keeping arrival order among retracted requests.
        position = 0
        while (
            position < len(self.waiting)
            and self.waiting[position].num_retractions > 0
            and (self.waiting[position].arrival_time < victim.arrival_time)
        ):
            position += 1
        self.waiting.insert(position, victim)
        return victim

    def requeue_running(self) -> list[Request]:
        """Move every running request back to the head of the queue, oldest first, freeing its
        pages; each keeps its output and is re-prefilled (a hot restart rebuilds the pool)."""
        parked = sorted(self.running, key=lambda r: r.arrival_time)
        self.running = []
        for req in parked:
            self._release(req, cache=False)
            req.state = RequestState.WAITING
        self.waiting.extendleft(reversed(parked))
        return parked

    def set_limits(self, max_running_requests: int, chunked_prefill_size: int) -> list[Request]:
        """Take new limits between two steps; returns the requests retracted to get under a
        lowered max-running-requests (newest first, requeued like any retraction)."""
        self.max_running_requests = max_running_requests
        self.prefill_budget = _prefill_budget(chunked_prefill_size)
        retracted = []
        while len(self.running) > max_running_requests:
            retracted.append(self._retract_newest())
        return retracted

    # ---- policy ----------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        for req in self._prefilled:
            self._share(req)
        self._prefilled = []
        retracted: list[Request] = []
        while True:
            batch = self._schedule_prefill() or self._schedule_decode(retracted)
            if batch is not None:
                if batch.kind == "prefill" and self.prefix_cache is not None:
                    self._prefilled = [c.req for c in batch.chunks]
                return ScheduledBatch(batch.kind, batch.chunks, tuple(retracted))
            if not self.running:
                return None
            # Nothing fits (e.g. a chunked prefill needs pages held by newer requests).
            retracted.append(self._retract_newest())

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.prefill_budget
        chunks: list[Chunk] = []
        for req in self.running:
            if budget <= 0:
                break
            if req.in_prefill:
                end = req.num_computed + min(req.num_pending, budget)
                if not self._grow(req, end):
                    break
                chunks.append(Chunk(req, req.num_computed, end))
                budget -= end - req.num_computed
        # Keep one page per decoding request in reserve so admission does not force an
        # immediate retraction on the next decode step.
        reserve = sum(1 for r in self.running if not r.in_prefill)
        admitted: list[Chunk] = []  # this step's new requests, for in-batch prefix sharing
        i = 0
        while i < len(self.waiting) and budget > 0:
            if len(self.running) >= self.max_running_requests:
                break
            req = self.waiting[i]
            cached = self._match(req)  # locked first: its own prefix is not evictable
            if self._shares_with(req, cached, admitted):
                self._unmatch(req)
                i += 1  # waits for the next step, keeping its place in the queue
                continue
            end = min(req.num_tokens, cached + budget)
            need = pages_needed(end, self.page_size) - len(req.pages)
            if need + reserve > self._available():
                self._unmatch(req)
                break
            del self.waiting[i]
            self._grow(req, end)
            req.state = RequestState.RUNNING
            req.num_computed = cached
            if self.draft_kv is not DraftKV.NONE:
                req.draft_computed = cached  # the cached pages hold the drafter's KV too
            if req.num_retractions == 0:
                req.num_cached_tokens = min(cached, req.num_prompt_tokens)
            self.running.append(req)
            chunks.append(Chunk(req, cached, end, cached=cached))
            admitted.append(chunks[-1])
            budget -= end - cached
        return ScheduledBatch("prefill", tuple(chunks)) if chunks else None

    def _schedule_decode(self, retracted: list[Request]) -> ScheduledBatch | None:
        while True:
            decoding = [r for r in self.running if not r.in_prefill]
            if not decoding:
                return None
            extra = sum(
                max(0, pages_needed(r.num_tokens, self.page_size) - len(r.pages)) for r in decoding
            )
            if extra <= self._available():
                break
            retracted.append(self._retract_newest())
        for req in decoding:
            self._grow(req, req.num_tokens)
        chunks = tuple(Chunk(r, r.num_computed, r.num_tokens) for r in decoding)
        return ScheduledBatch("decode", chunks)

    def schedule_ahead(self, batch: ScheduledBatch) -> ScheduledBatch | None:
        """The decode step after `batch`, scheduled while `batch` is still running, so before
        its tokens are known: its requests, one position further. None when the next step
        may have to differ (queued requests to admit, a prefill to continue, a token history
        for penalties to sample with, pages to retract for), so it is scheduled normally
        once `batch`'s tokens are in. A request that `batch` brings to its max_new_tokens
        is left out; one that stops on a token or string in `batch` runs one extra row,
        whose token is dropped."""
        live = [c for c in batch.chunks if not c.req.finished]  # some stopped a step ago
        if batch.kind != "decode" or self.waiting or len(live) != len(self.running):
            return None
        chunks: list[Chunk] = []
        for chunk in live:
            req = chunk.req
            if not chunk.samples or req.params.penalized:  # needs the token in flight
                return None
            if len(req.output_ids) + 1 >= req.max_new_tokens:
                continue
            if not self._grow(req, chunk.end + 1):  # the KV slot of position chunk.end
                return None
            chunks.append(Chunk(req, chunk.end, chunk.end + 1, ahead=True))
        return ScheduledBatch("decode", tuple(chunks)) if chunks else None

    def check_integrity(self) -> None:
        tree = self.prefix_cache
        owned = [r.pages[r.num_shared_pages :] for r in self.requests()]
        if tree is not None:
            tree.check_integrity()
            owned.extend(tree.owned_pages())
            for req in self.running:
                if req.prefix_node is not None:
                    shared = req.pages[: req.num_shared_pages]
                    assert tree.pages_to(req.prefix_node) == shared, (
                        f"request {req.rid} reads pages the cache no longer holds for it"
                    )
        self.allocator.check_integrity(owned)
        for req in self.waiting:
            assert not req.pages, f"queued request {req.rid} holds pages"
            assert req.prefix_node is None, f"queued request {req.rid} holds a cache lock"
        assert len(self.running) <= self.max_running_requests


def _prefill_budget(chunked_prefill_size: int) -> int:
    """Prefill tokens per step; -1 (chunking off) means no limit."""
    return chunked_prefill_size if chunked_prefill_size > 0 else 1 << 62
