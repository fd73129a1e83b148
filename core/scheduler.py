"""Continuous batching policy: FCFS admission, chunked prefill, decode, retract-and-requeue.

Pure policy over `Request` objects and a `PageAllocator`: no model, no tensors, so it is tested
on its own. Like SGLang, a step is either a prefill batch (new or chunked requests, prefill has
priority) or a decode batch (every running request that has finished its prefill).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .kv_cache import PageAllocator, pages_needed
from .request import Request, RequestState


@dataclass(frozen=True)
class Chunk:
    """Process the tokens [start, end) of `req`; sample a new token when that reaches its end.
    `ahead`: scheduled while the step that samples the token at `start` is still in flight
    (overlap schedule), so that token is not in `req` yet and comes from the device."""

    req: Request
    start: int
    end: int
    ahead: bool = False
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
    ) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.max_running_requests = max_running_requests
        self.prefill_budget = _prefill_budget(chunked_prefill_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # ---- bookkeeping -----------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_usable * self.page_size

    def add(self, req: Request) -> None:
        req.state = RequestState.WAITING
        self.waiting.append(req)

    def requests(self) -> Iterator[Request]:
        yield from self.running
        yield from self.waiting

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def finish(self, req: Request) -> None:
        """Drop a finished request from the running set and free its pages."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.state = RequestState.FINISHED

    def _release(self, req: Request) -> None:
        self.allocator.free(req.pages)
        req.pages = []
        req.num_computed = 0
        req.draft_computed = 0
        req.draft_features = None

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Give `req` pages for its first `num_tokens` tokens, if the pool has them."""
        extra = pages_needed(num_tokens, self.page_size) - len(req.pages)
        if extra <= 0:
            return True
        if not self.allocator.can_alloc(extra):
            return False
        req.pages.extend(self.allocator.alloc(extra))
        return True

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
        self._release(victim)
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
            self._release(req)
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
        retracted: list[Request] = []
        while True:
            batch = self._schedule_prefill() or self._schedule_decode(retracted)
            if batch is not None:
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
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            req = self.waiting[0]
            end = min(req.num_tokens, budget)
            need = pages_needed(end, self.page_size)
            if need + reserve > self.allocator.num_free:
                break
            self.waiting.popleft()
            self._grow(req, end)
            req.state = RequestState.RUNNING
            self.running.append(req)
            chunks.append(Chunk(req, 0, end))
            budget -= end
        return ScheduledBatch("prefill", tuple(chunks)) if chunks else None

    def _schedule_decode(self, retracted: list[Request]) -> ScheduledBatch | None:
        while True:
            decoding = [r for r in self.running if not r.in_prefill]
            if not decoding:
                return None
            extra = sum(
                max(0, pages_needed(r.num_tokens, self.page_size) - len(r.pages)) for r in decoding
            )
            if extra <= self.allocator.num_free:
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
        self.allocator.check_integrity(r.pages for r in self.requests())
        for req in self.waiting:
            assert not req.pages, f"queued request {req.rid} holds pages"
        assert len(self.running) <= self.max_running_requests


def _prefill_budget(chunked_prefill_size: int) -> int:
    """Prefill tokens per step; -1 (chunking off) means no limit."""
    return chunked_prefill_size if chunked_prefill_size > 0 else 1 << 62
