"""SiLU(gate) * up over the MLP's merged gate_up projection (Triton), with a torch reference.

The gate_up GEMM writes [T, 2I] (gate in the first half of each row, up in the second); this
kernel reads both halves once and writes [T, I], where torch needs a silu pass and a mul pass.
Grid: (T, cdiv(I, BLOCK)), one contiguous BLOCK of a row per program.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import pdl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see kernels/pdl.py: everything below may read what the last kernel wrote
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    gate_up: torch.Tensor,  # [T, 2I]
    out: torch.Tensor | None = None,  # [T, I]
) -> torch.Tensor:  # [T, I]
    tokens, width = gate_up.shape
    assert width % 2 == 0 and gate_up.stride(-1) == 1, "gate_up must be [T, 2I], rows contiguous"
    inter = width // 2
    if out is None:
        out = gate_up.new_empty(tokens, inter)
    block = min(triton.next_power_of_2(inter), 1024)
    if tokens:
        grid = (tokens, triton.cdiv(inter, block))
        use_pdl = pdl.enabled(gate_up)
        _silu_and_mul_kernel[grid](
            gate_up,
            out,
            gate_up.stride(0),
            out.stride(0),
            inter,
            BLOCK=block,
            USE_PDL=use_pdl,
            num_warps=4,
            **pdl.launch_options(use_pdl),
        )
    return out


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)
