"""Attention backends behind one interface; `make_backend` picks one by name."""

from __future__ import annotations

from ..kv_cache import KVPool
from .base import AttentionBackend, AttentionInputs
from .torch_backend import TorchAttention

__all__ = ["AttentionBackend", "AttentionInputs", "TorchAttention", "make_backend"]


def make_backend(name: str, pool: KVPool) -> AttentionBackend:
    if name == "torch":
        return TorchAttention(pool)
    raise ValueError(
        f"--attention-backend {name} is not available in this build; use torch "
        "(the triton, flashinfer and fa3 backends come with the GPU path)"
    )
