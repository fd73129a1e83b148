"""Attention backends behind one interface; `make_backend` picks one by name."""

from __future__ import annotations

from ..config import ConfigError
from ..kv_cache import KVPool
from .base import AttentionBackend, AttentionInputs
from .torch_backend import TorchAttention

__all__ = ["AttentionBackend", "AttentionInputs", "TorchAttention", "make_backend"]


def make_backend(name: str, pool: KVPool) -> AttentionBackend:
    """Raises ConfigError (a ValueError) naming the flag when `name` can't run on `pool.device`."""
    if name == "torch":
        return TorchAttention(pool)
    if name == "triton":
        if pool.device.type != "cuda":
            raise ConfigError(
                f"--attention-backend triton needs a CUDA device (this engine runs on "
                f"{pool.device.type}); use --attention-backend torch"
            )
        try:  # imported here: triton is optional and slow to import
            from .triton_backend import TritonAttention
        except ImportError as exc:
            raise ConfigError(
                f"--attention-backend triton needs the triton package ({exc}); "
                "pip install triton, or use --attention-backend torch"
            ) from exc
        return TritonAttention(pool)
    raise ConfigError(
        f"--attention-backend {name} is not available in this build; use torch or triton "
        "(the flashinfer and fa3 backends come later in the GPU path)"
    )
