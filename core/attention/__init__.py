"""Attention backends behind one interface; `make_backend` picks one by name."""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..kv_cache import KVPool
from .base import AttentionBackend, AttentionInputs
from .torch_backend import TorchAttention

__all__ = [
    "AttentionBackend",
    "AttentionInputs",
    "TorchAttention",
    "make_backend",
    "require_cuda",
]


def make_backend(name: str, pool: KVPool) -> AttentionBackend:
    """Raises ConfigError (a ValueError) naming the flag when `name` can't run on `pool.device`."""
    if name == "torch":
        return TorchAttention(pool)
    if name == "triton":
        require_cuda(name, pool.device.type)
        try:  # imported here: triton is optional and slow to import
            from .triton_backend import TritonAttention
        except ImportError as exc:
            raise ConfigError(
                f"--attention-backend triton needs the triton package ({exc}); "
                "pip install triton, or use --attention-backend torch"
            ) from exc
        return TritonAttention(pool)
    if name in ("flashinfer", "fa3"):
        return _flashinfer(name, pool)
    raise ConfigError(
        f"--attention-backend {name} is not available; use flashinfer, fa3, triton or torch"
    )


def require_cuda(name: str, device_type: str) -> None:
    """Every backend but torch runs on CUDA only; the engine checks this before building."""
    if name != "torch" and device_type != "cuda":
        raise ConfigError(
            f"--attention-backend {name} needs a CUDA device (this engine runs on "
            f"{device_type}); use --attention-backend torch"
        )


def _flashinfer(name: str, pool: KVPool) -> AttentionBackend:
    """`flashinfer` (FA2 kernels) or `fa3` (FlashInfer's Hopper FA3 prefill kernels)."""
    require_cuda(name, pool.device.type)
    spec = pool.spec
    if spec.dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(
            f"--attention-backend {name} needs --dtype bfloat16 or float16 (this engine runs "
            f"{str(spec.dtype).removeprefix('torch.')}); use --attention-backend triton or torch"
        )
    if spec.head_dim not in (64, 128, 256):
        raise ConfigError(
            f"--attention-backend {name} supports head dims 64, 128 and 256, not "
            f"{spec.head_dim}; use --attention-backend triton or torch"
        )
    if name == "fa3":
        major, minor = torch.cuda.get_device_capability(pool.device)
        if major != 9:
            card = torch.cuda.get_device_name(pool.device)
            raise ConfigError(
                f"--attention-backend fa3 needs a Hopper GPU (SM90: H100, H200); {card} is "
                f"SM{major}{minor}; use --attention-backend flashinfer"
            )
    try:  # imported here: flashinfer is optional, CUDA-only and slow to import
        from .flashinfer_backend import FlashInferAttention

        return FlashInferAttention(pool, prefill_kernels="fa3" if name == "fa3" else "fa2")
    except ImportError as exc:
        raise ConfigError(
            f"--attention-backend {name} needs the flashinfer package ({exc}); "
            "pip install flashinfer-python==0.5.3, or use --attention-backend triton"
        ) from exc
