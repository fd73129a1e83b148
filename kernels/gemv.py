"""y = x W^T (+ b) for one row of x (Triton), with a torch reference: batch-1 decode's matmuls.

At batch 1 every projection is a matrix-vector product, bound by reading W once: cuBLAS reaches
~2.7 TB/s on an H100 for Llama-3-8B's shapes, short of the ~3.0+ TB/s a plain streaming read
gets. Here each program owns BLOCK_N whole rows of W [N, K] (row-major, as nn.Linear stores it),
walks K in BLOCK_K chunks, keeps a [BLOCK_N, BLOCK_K] fp32 partial product in registers and
reduces it once at the end. Many small programs (N / BLOCK_N of them) keep every SM streaming
with no split-K reduction pass; W is loaded evict-first, as it is read once per step.
Grid: (cdiv(N, BLOCK_N),).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import pdl


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K]
    w_ptr,  # [N, K], rows of stride_w
    b_ptr,  # [N] or unused
    out_ptr,  # [N]
    N,
    K,
    stride_w,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks on the K axis
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,  # see kernels/pdl.py
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = tl.where(row_ok, rows, 0)  # out-of-range rows re-read row 0; never stored
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # The first weight chunk is loaded before waiting for x (W is never written by a kernel):
    # under PDL it streams in while the previous kernel finishes.
    cols = tl.arange(0, BLOCK_K)
    if EVEN_K:
        w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
    else:
        w = tl.load(
            w_rows + cols[None, :],
            mask=(cols < K)[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
    acc = w.to(tl.float32) * x.to(tl.float32)[None, :]  # [BLOCK_N, BLOCK_K]
    for start in range(BLOCK_K, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + cols)
            w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
        else:
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
            w = tl.load(
                w_rows + cols[None, :],
                mask=col_ok[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


def gemv_config(n: int, k: int) -> GemvConfig:
    """Launch shape for W [n, k], from a sweep on an H100 over Llama-3-8B's shapes (block_n 1-32,
    block_k 128-2048, 1-8 warps; each shape's best, in us, against cuBLAS): qkv 6144x4096 20.1 vs
    22.8, o 4096x4096 18.9 vs 19.3, gate_up 28672x4096 76.8 vs 83.1, down 4096x14336 42.1 vs
    46.1, lm_head 128256x4096 332 vs 373. Small matrices want several rows per program (more
    bytes in flight each), large ones one row and long K chunks."""
    size = n * k
    if size <= 4096 * 4096:
        block_n, block_k, warps = 8, 1024, 2
    elif k > 8192:
        block_n, block_k, warps = 2, 2048, 8
    elif size < 32 * 2**20:
        block_n, block_k, warps = 2, 1024, 4
    else:
        block_n, block_k, warps = 1, 2048, 4
    return GemvConfig(
        block_n=min(block_n, triton.next_power_of_2(n)),
        block_k=min(block_k, triton.next_power_of_2(k)),
        num_warps=warps,
    )


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One contiguous row of x against a weight whose rows are contiguous, on CUDA."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.shape[0] == 1
        and x.is_contiguous()
        and weight.stride(1) == 1
        and x.dtype == weight.dtype
    )


def gemv(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [1, N]
    config: GemvConfig | None = None,
) -> torch.Tensor:  # [1, N]
    n, k = weight.shape
    assert x.shape == (1, k) and x.stride(-1) == 1 and weight.stride(1) == 1, (x.shape, k)
    if out is None:
        out = x.new_empty(1, n)
    cfg = config or gemv_config(n, k)
    grid = (triton.cdiv(n, cfg.block_n),)
    use_pdl = pdl.enabled(x)
    _gemv_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        n,
        k,
        weight.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        USE_PDL=use_pdl,
        num_warps=cfg.num_warps,
        **pdl.launch_options(use_pdl),
    )
    return out


def gemv_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 accumulation, rounded to x's dtype once, as the kernel does."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)
