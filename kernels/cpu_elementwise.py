"""A decoder layer's element-wise glue on the CPU in one C call each (`cpu_elementwise.c`): the
residual add fused with RMSNorm, and SiLU(gate) * up. Built into the same library as
`cpu_blocks.c` (see `cpu_blocks.library`)."""

from __future__ import annotations

import ctypes

import torch


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("CPU element-wise kernels take contiguous fp32 CPU tensors")


def add_rms_norm(
    lib: ctypes.CDLL,
    x: torch.Tensor,  # [T, N]
    residual: torch.Tensor | None,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual), x + residual); without a residual (norm(x), None). `inplace`
    writes them into x and residual, as the CUDA kernel's caller does."""
    tensors = (x, weight) if residual is None else (x, residual, weight)
    _check(*tensors)
    if (
        x.dim() != 2
        or weight.shape != (x.shape[1],)
        or (residual is not None and residual.shape != x.shape)
    ):
        raise ValueError(f"x {tuple(x.shape)}, residual and weight {tuple(weight.shape)} differ")
    out = x if inplace else torch.empty_like(x)
    res = None if residual is None else (residual if inplace else torch.empty_like(x))
    rc = lib.add_rms_norm(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        x.shape[0],
        x.shape[1],
        eps,
        out.data_ptr(),
        None if res is None else res.data_ptr(),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"add_rms_norm refused x {tuple(x.shape)}")
    return out, res


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    _check(gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate|up must be [T, 2I], got {tuple(gate_up.shape)}")
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    if gate_up.shape[0] and lib.silu_mul(
        gate_up.data_ptr(), gate_up.shape[0], out.shape[1], out.data_ptr(), torch.get_num_threads()
    ):
        raise ValueError(f"silu_mul refused {tuple(gate_up.shape)}")
    return out
