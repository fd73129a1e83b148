"""RMSNorm and fused residual-add + RMSNorm (Triton), with pure-torch references.

One program normalises one row: the whole hidden vector fits in registers (4096-8192 elements
over 8 warps), so x is read once and written once. Statistics are fp32; the normalised value is
rounded to the input dtype before the weight multiply, as our model and Hugging Face Llama do.

`split_add_rms_norm` also finishes a split-K product (kernels/skinny_gemm.py): x arrives as the
fp32 partial sums of its K slices, which are added (with the bias) and rounded exactly as the
skinny GEMM's own summing kernel would, so batched decode's o and down projections need no
separate summing kernel before the norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, N]; with SPLIT > 1 fp32 partial sums [SPLIT, T, N] (contiguous)
    bias_ptr,  # [N], added to the summed partials; read only when HAS_BIAS
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
    SPLIT: tl.constexpr,  # 1: x is a plain row; > 1: that many fp32 partials to sum first
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see kernels/pdl.py: everything below may read what the last kernel wrote
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    if SPLIT == 1:
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    else:  # the skinny GEMM's split-K epilogue: slices added in order, bias, one rounding
        parts = x_ptr + row * hidden + cols
        acc = tl.load(parts, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT):
            acc += tl.load(parts + s * tl.num_programs(0) * hidden, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = acc.to(residual_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # The sum is rounded to the input dtype first: that rounded value is the residual stream
        # the next layer sees, so the norm must be taken of it too (as vLLM's kernel does).
        x = (x.to(tl.float32) + r.to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_r_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    normed = (x32 * rstd).to(out_ptr.dtype.element_ty)
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
    bias: torch.Tensor | None = None,  # with split partials only
) -> None:
    hidden = x.shape[-1]
    split = 1 if x.dim() == 2 else x.shape[0]
    if split > 1:
        assert x.dim() == 3 and x.is_contiguous() and x.dtype == torch.float32
        assert residual is not None, "split partials are always added to a residual"
        x_rows = x[0]
    else:
        assert x.dim() == 2 and x.stride(-1) == 1, "x must be [T, N] with contiguous rows"
        x_rows = x
    assert weight.shape == (hidden,) and weight.is_contiguous()
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 512, 1), 8)
    res = residual if residual is not None else x
    res_out = residual_out if residual_out is not None else out
    use_pdl = pdl.enabled(x)
    _rms_norm_kernel[(x_rows.shape[0],)](
        x,
        bias if bias is not None else weight,
        res,
        weight,
        out,
        res_out,
        x_rows.stride(0),
        res.stride(0),
        out.stride(0),
        res_out.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        SPLIT=split,
        HAS_BIAS=bias is not None,
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


def split_add_rms_norm(
    parts: torch.Tensor,  # [S, T, N] fp32: a split-K product's slices, S >= 2
    bias: torch.Tensor | None,  # [N], of the product
    residual: torch.Tensor,  # [T, N]: updated in place
    weight: torch.Tensor,  # [N]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (norm(x + residual), x + residual), residual's dtype
    """fused_add_rms_norm(x, residual) where x = round(sum of parts + bias) is a skinny GEMM's
    split-K output that was never summed: one kernel instead of two, identical results."""
    assert parts.dim() == 3 and parts.shape[0] >= 2 and parts.shape[1:] == residual.shape
    assert residual.is_contiguous()
    out = torch.empty_like(residual)
    if residual.shape[0]:
        _launch(parts, residual, weight, eps, out, residual, bias=bias)
    return out, residual


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
