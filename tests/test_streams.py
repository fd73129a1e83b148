"""The engine thread -> event loop bridge: many streams' deltas, handed over in batches, arrive
complete and in order; a closed loop is an error for the engine thread, as it always was."""

from __future__ import annotations

import asyncio
import threading

import pytest

from llmconsole.core.outputs import Delta
from llmconsole.core.server.streams import LoopMailbox


def test_deltas_from_the_engine_thread_arrive_complete_and_in_order() -> None:
    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        mailbox = LoopMailbox.of(loop)
        assert LoopMailbox.of(loop) is mailbox  # one per loop
        queues: list[asyncio.Queue[Delta]] = [asyncio.Queue() for _ in range(64)]

        def engine_thread() -> None:  # 64 streams, 50 steps, every stream fed every step
            for step in range(50):
                for i, q in enumerate(queues):
                    mailbox.post(q, Delta(f"r{i}", "", (step,), finished=step == 49))

        thread = threading.Thread(target=engine_thread)
        thread.start()

        async def read(q: asyncio.Queue[Delta]) -> list[int]:
            got: list[int] = []
            while True:
                delta = await q.get()
                got.extend(delta.token_ids)
                if delta.finished:
                    return got

        results = await asyncio.gather(*(read(q) for q in queues))
        thread.join()
        return results

    assert asyncio.run(main()) == [list(range(50))] * 64


def test_posting_to_a_closed_loop_raises_in_the_engine_thread() -> None:
    loop = asyncio.new_event_loop()
    mailbox = LoopMailbox.of(loop)
    loop.close()
    queue: asyncio.Queue[Delta] = asyncio.Queue()
    for _ in range(2):  # and again: nothing stays stuck in the mailbox
        with pytest.raises(RuntimeError):
            mailbox.post(queue, Delta("r", "x", (1,)))
