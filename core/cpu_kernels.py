"""The CPU's compiled C kernels (GGUF-block products, decode attention; `kernels/cpu_*.c`): one
library, built into the user cache folder on first use (see `kernels/cpu_blocks.py`)."""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from llmconsole.kernels import cpu_blocks


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled library, or None (`cpu_blocks.unavailable_reason()` says why). Resolved
    once per process: the model asks for it ~90 times a decode step, and finding the cache
    folder and taking the build lock each time cost ~16 us a call."""
    from .models.gguf_import import cache_root

    return cpu_blocks.library(cache_root() / "kernels")


def elementwise(x: torch.Tensor) -> ctypes.CDLL | None:
    """The library for the element-wise C kernels (`kernels/cpu_elementwise.c`) when `x` is an
    fp32 CPU tensor and LLMCONSOLE_CPU_FUSED_OPS is not "0" (A/B runs); else None."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if os.environ.get("LLMCONSOLE_CPU_FUSED_OPS", "1") == "0":
        return None
    return library()
