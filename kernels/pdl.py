"""Programmatic dependent launch (PDL, Hopper and later): a kernel's launch and first loads
overlap the previous kernel's tail.

A kernel launched with `launch_pdl=True` may start while the kernel before it in the stream is
still running. Its contract: call `gdc_launch_dependents()` early (lets the next kernel start the
same way) and `gdc_wait()` before touching any memory the previous kernels write, i.e. before
every load of an activation and every store. Weights may be read before the wait; that is the
point of it for the batch-1 GEMV, whose first weight chunk streams in while the previous kernel
finishes. A kernel launched plainly after a PDL kernel waits for it in full, as always, so PDL
kernels and torch / cuBLAS / FlashInfer kernels mix freely.

`LLMCONSOLE_PDL=0` in the environment at start-up turns it off (to measure what it buys, or to
rule it out).
"""

from __future__ import annotations

import functools
import os

import torch

# Read once: `enabled` runs at every kernel launch, ~200 times per eager decode step.
SWITCHED_ON = os.environ.get("LLMCONSOLE_PDL", "1") != "0"


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device use PDL: a CUDA tensor on SM90+, unless switched off."""
    if not (SWITCHED_ON and t.is_cuda):
        return False
    return _device_supports(t.device.index if t.device.index is not None else 0)


def launch_options(use: bool) -> dict[str, bool]:
    """Extra launch arguments: none when PDL is off (the interpreter knows no `launch_pdl`)."""
    return {"launch_pdl": True} if use else {}
