"""What callers get back: streamed deltas, final results, and the handle that carries them."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .runner import TokenLogprob


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """New output of one request since the previous delta; the last one has `finished=True`."""

    rid: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage | None = None  # on the final delta
    # logprobs of prompt tokens 1.. (the first has no context), on the first delta only
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class GenerationResult:
    rid: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    def add(self, delta: Delta) -> None:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = list(delta.prompt_logprobs)
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.error = delta.error
            self.usage = delta.usage


class RequestHandle:
    """Iterate for deltas (blocking); `result()` waits for the end; `abort()` cancels.

    The engine thread writes into the handle's outbox; the handle is read by one consumer."""

    def __init__(
        self,
        rid: str,
        prompt_tokens: int,
        abort: Callable[[str], None],
        sink: Callable[[Delta], None] | None = None,
    ) -> None:
        self.rid = rid
        self.prompt_tokens = prompt_tokens
        self._outbox: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        self._abort = abort
        self._sink = sink  # e.g. hands deltas to an asyncio loop instead of the outbox
        self._done = False

    def put(self, delta: Delta) -> None:  # engine thread only
        if self._sink is not None:
            self._sink(delta)
        else:
            self._outbox.put(delta)

    def get(self, timeout: float | None = None) -> Delta | None:
        """The next delta, or None when the request has ended or the wait timed out."""
        if self._done:
            return None
        try:
            delta = self._outbox.get(timeout=timeout)
        except queue.Empty:
            return None
        self._done = delta.finished
        return delta

    def __iter__(self) -> Iterator[Delta]:
        while (delta := self.get()) is not None:
            yield delta

    def result(self) -> GenerationResult:
        result = GenerationResult(self.rid)
        for delta in self:
            result.add(delta)
        return result

    def abort(self) -> None:
        self._abort(self.rid)

    @property
    def done(self) -> bool:
        return self._done
