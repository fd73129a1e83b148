"""Waiting on engine state from tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from llmconsole.core import Engine


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def wait_idle(engine: Engine, timeout: float = 60.0) -> None:
    """The engine has no request left and every KV page is back in the pool."""
    assert wait_until(
        lambda: (
            engine.stats()["running"] == 0
            and engine.stats()["queued"] == 0
            and engine.stats()["kv_pages_used"] == 0
        ),
        timeout,
    ), f"engine not idle: {engine.stats()}"
