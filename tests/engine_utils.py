"""Waiting on engine state from tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

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


def save_random_llama(
    path: Path,
    *,
    hidden_size: int,
    num_heads: int = 4,
    num_kv_heads: int = 1,
    max_positions: int = 1024,
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
) -> transformers.LlamaForCausalLM:
    """A random 2-layer Llama (intermediate 2x hidden, vocabulary 512) saved by transformers at
    `path`, its matrices ~N(0, 0.08) so greedy paths are decisive rather than ties near zero."""
    config = transformers.LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=512,
        max_position_embeddings=max_positions,
    )
    if seed is not None:
        torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
    model.to(dtype).save_pretrained(path)
    return model
