"""Host -> device copies that never stall the host.

`tensor.to("cuda")` from ordinary (pageable) memory waits for the whole stream to drain before it
copies; a step that builds its inputs while the GPU still runs would sync on every such copy.
Copies from pinned memory with `non_blocking=True` are queued like kernels instead, and PyTorch's
pinned-memory cache keeps the host buffer alive until its copy has run.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host` on `device`, queued on the current stream (the same tensor when already there)."""
    device = torch.device(device)
    if host.device == device:
        return host
    if device.type == "cuda" and host.device.type == "cpu":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def int64_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A flat int64 tensor on `device` from a Python list, in one queued copy."""
    return to_device(torch.tensor(values, dtype=torch.int64), device)
