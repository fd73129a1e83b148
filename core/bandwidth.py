"""The device's measured memory copy rate: the yardstick a memory-bound decode step is held to.

Measured, not looked up: a datasheet's peak is never reached, and on a CPU the rate depends on
how many cores the process has. A device-to-device copy of a buffer well beyond the caches
reads and writes every byte once, so (read + written bytes) / time is what the memory delivers
to a streaming kernel; decode's weight and KV reads can run at about that rate.
"""

from __future__ import annotations

import time

import torch

# Buffer copied: beyond any L2 / L3 here (50 MB on an H100, 32 MB on the dev box), small enough to
# cost ~1 ms on a GPU and tens of ms on a CPU at start-up.
GPU_BYTES = 512 << 20
CPU_BYTES = 64 << 20


def copy_rate(device: torch.device, nbytes: int | None = None, repeats: int = 3) -> float:
    """Bytes per second (read + written) of the best of `repeats` copies of `nbytes` bytes."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # events and copies on that card's current stream
            return _copy_rate(device, nbytes or GPU_BYTES, repeats)
    return _copy_rate(device, nbytes or CPU_BYTES, repeats)


def _copy_rate(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)  # touch every page before timing
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the KV pool is sized from free memory next
    return 2 * nbytes / best
