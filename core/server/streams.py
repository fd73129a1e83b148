"""Bridges between the engine thread and asyncio handlers: submit, stream deltas, abort on exit.

A request's deltas go from the engine thread to the event loop through the loop's
`LoopMailbox` (no executor thread per request, one loop wakeup per batch of deltas), and
leaving a stream early — a client that disconnected, a cancelled handler — aborts the engine
request so its KV pages come back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine import Engine, EngineStoppedError, RequestError
from ..outputs import Delta, GenerationResult
from ..sampling_params import SamplingParams
from .errors import APIError
from .schemas import SamplingFields


class LoopMailbox:
    """Deltas from the engine thread to one event loop, many per wakeup. The engine thread
    appends under a lock and wakes the loop only when the mailbox was empty, so a decode step
    that feeds N streams costs the loop one wakeup (one self-pipe write), not N; the loop then
    hands every waiting delta to its stream's queue in arrival order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.Queue[Delta], Delta]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
        mailbox = _MAILBOXES.get(loop)
        if mailbox is None:
            mailbox = _MAILBOXES[loop] = cls(loop)
        return mailbox

    def post(self, queue: asyncio.Queue[Delta], delta: Delta) -> None:  # engine thread
        with self._lock:
            wake = not self._waiting
            self._waiting.append((queue, delta))
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody reads these any more
                with self._lock:
                    self._waiting.clear()
                raise

    def _deliver(self) -> None:  # event loop
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for queue, delta in waiting:
            queue.put_nowait(delta)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox] = (
    weakref.WeakKeyDictionary()
)


class DeltaStream:
    """One engine request seen from the event loop."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
        self._mailbox = LoopMailbox.of(asyncio.get_running_loop())
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.prompt_ids = prompt_ids
        self.handle = engine.submit(prompt_ids, params, sink=self._sink)
        self.finished = False

    def _sink(self, delta: Delta) -> None:  # engine thread
        self._mailbox.post(self._queue, delta)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while not self.finished:
                delta = await self._queue.get()
                self.finished = delta.finished
                yield delta
        finally:
            if not self.finished:
                self.handle.abort()

    async def result(self) -> GenerationResult:
        result = GenerationResult(self.handle.rid)
        async for delta in self:
            result.add(delta)
        return result

    def abort(self) -> None:
        if not self.finished:
            self.handle.abort()


@dataclass(frozen=True)
class Choice:
    index: int
    stream: DeltaStream


def submit_choices(
    engine: Engine, prompts: Sequence[list[int]], params: SamplingParams, n: int
) -> list[Choice]:
    """n choices per prompt; with a seed, choice i uses seed + i so they differ but replay."""
    choices: list[Choice] = []
    try:
        for prompt in prompts:
            for i in range(n):
                p = params
                if params.seed is not None and i:
                    p = dataclasses.replace(params, seed=params.seed + i)
                choices.append(Choice(len(choices), DeltaStream(engine, prompt, p)))
    except EngineStoppedError as exc:
        for choice in choices:
            choice.stream.abort()
        raise APIError(503, str(exc), "service_unavailable") from None
    except RequestError as exc:
        for choice in choices:
            choice.stream.abort()
        param = "prompt" if exc.code == "context_length_exceeded" else None
        raise APIError(400, str(exc), param=param, code=exc.code) from None
    return choices


_PARAM_NAME = re.compile(r"^([a-z_]+)")


def sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """OpenAI fields -> SamplingParams; OpenAI's defaults where a field is absent."""
    stop = body.stop

    def given(value: Any, default: Any) -> Any:  # not `or`: 0 is a value, and may be invalid
        return default if value is None else value

    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": given(body.temperature, 1.0),
        "top_p": given(body.top_p, 1.0),
        "top_k": -1 if body.top_k is None or body.top_k == 0 else body.top_k,  # 0 = off (vLLM)
        "min_p": given(body.min_p, 0.0),
        "min_tokens": given(body.min_tokens, 0),
        "repetition_penalty": given(body.repetition_penalty, 1.0),
        "frequency_penalty": given(body.frequency_penalty, 0.0),
        "presence_penalty": given(body.presence_penalty, 0.0),
        "seed": body.seed,
        "stop": () if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop)),
        "stop_token_ids": tuple(body.stop_token_ids or ()),
        "ignore_eos": body.ignore_eos,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "skip_special_tokens": body.skip_special_tokens,
    }
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        match = _PARAM_NAME.match(str(exc))
        raise APIError(400, str(exc), param=match.group(1) if match else None) from None


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, Delta]]:
    """Deltas of several choices as they come; leaving early aborts every unfinished one."""
    queue: asyncio.Queue[tuple[Choice, Delta] | None] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        async for delta in choice.stream:
            await queue.put((choice, delta))
        await queue.put(None)

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            choice.stream.abort()


async def collect(choices: list[Choice], request: Any) -> list[GenerationResult]:
    """Wait for every choice; a client that goes away aborts them within ~0.1 s."""
    tasks = [asyncio.ensure_future(c.stream.result()) for c in choices]
    try:
        while True:
            _, pending = await asyncio.wait(tasks, timeout=0.1)
            if not pending:
                return [t.result() for t in tasks]
            if await request.is_disconnected():
                raise asyncio.CancelledError("client disconnected")
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            choice.stream.abort()


def raise_for_engine_error(results: Sequence[GenerationResult]) -> None:
    """An engine-side failure (not the client's input): 503 while shutting down, else 500."""
    for result in results:
        if result.finish_reason == "error" and result.error:
            status = 503 if "shut down" in result.error else 500
            raise APIError(status, result.error, "internal_error")


def sse(payload: Any) -> str:
    import json

    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"
