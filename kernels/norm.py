"""RMSNorm and fused residual-add + RMSNorm (Triton), with pure-torch references.

One program normalises one row: the whole hidden vector fits in registers (4096-8192 elements
over 8 warps), so x is read once and written once. Statistics are fp32; the normalised value is
rounded to the input dtype before the weight multiply, as our model and Hugging Face Llama do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,  # read only when HAS_RESIDUAL
    weight_ptr,
    out_ptr,
    residual_out_ptr,  # written only when HAS_RESIDUAL
    stride_x,
    stride_r,
    stride_out,
    stride_r_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see kernels/pdl.py: everything below may read what the last kernel wrote
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The sum is rounded to the input dtype first: that rounded value is the residual stream
        # the next layer sees, so the norm must be taken of it too (as vLLM's kernel does).
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_r_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual_out: torch.Tensor | None,
) -> None:
    hidden = x.shape[-1]
    assert x.dim() == 2 and x.stride(-1) == 1, "x must be [T, N] with contiguous rows"
    assert weight.shape == (hidden,) and weight.is_contiguous()
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 512, 1), 8)
    res = residual if residual is not None else x
    res_out = residual_out if residual_out is not None else out
    use_pdl = pdl.enabled(x)
    _rms_norm_kernel[(x.shape[0],)](
        x,
        res,
        weight,
        out,
        res_out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        res_out.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        USE_PDL=use_pdl,
        num_warps=num_warps,
        **pdl.launch_options(use_pdl),
    )


def rms_norm(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    out: torch.Tensor | None = None,  # [T, N]; may be x itself
) -> torch.Tensor:  # [T, N], x's dtype
    out = torch.empty_like(x) if out is None else out
    if x.shape[0]:
        _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, N]
    residual: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # (norm(x + residual), x + residual), both [T, N]
    """The pre-norm block's two outputs in one pass. `inplace=True` writes them into x and
    residual (vLLM's convention), saving two [T, N] allocations per layer."""
    assert residual.shape == x.shape and residual.stride(-1) == 1
    if inplace:
        out, residual_out = x, residual
    else:
        out, residual_out = torch.empty_like(x), torch.empty_like(residual)
    if x.shape[0]:
        _launch(x, residual, weight, eps, out, residual_out)
    return out, residual_out


# ---- pure-torch references -----------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(summed, weight, eps), summed
