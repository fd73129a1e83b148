"""Shared fixtures: one engine on the real default model for the whole session (loading costs
seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_utils import save_random_llama

from llmconsole.core import Engine, EngineConfig


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    eng = Engine(EngineConfig())
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def tiny_bf16_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random bf16 Llama with Llama-3's head dim (128) and GQA group (4), for GPU tests."""
    path = tmp_path_factory.mktemp("tiny-bf16-llama")
    save_random_llama(path, hidden_size=512, max_positions=2048, dtype=torch.bfloat16)
    return path
