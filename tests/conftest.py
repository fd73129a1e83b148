"""Shared fixtures: one engine on the real default model for the whole session (loading costs
seconds)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmconsole.core import Engine, EngineConfig


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    eng = Engine(EngineConfig())
    yield eng
    eng.shutdown()
