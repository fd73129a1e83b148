"""y = x W^T (+ b) for one row of x (Triton), with a torch reference: batch-1 decode's matmuls.

At batch 1 every projection is a matrix-vector product, bound by reading W once: cuBLAS reaches
~2.7 TB/s on an H100 for Llama-3-8B's shapes, short of the ~3.0+ TB/s a plain streaming read
gets. Here each program owns BLOCK_N whole rows of W [N, K] (row-major, as nn.Linear stores it),
walks K in BLOCK_K chunks, keeps a [BLOCK_N, BLOCK_K] fp32 partial product in registers and
reduces it once at the end. Many small programs (N / BLOCK_N of them) keep every SM streaming
with no split-K reduction pass; W is loaded evict-first, as it is read once per step.
Grid: (cdiv(N, BLOCK_N),).

`gemv_silu_mul` is the MLP's gate_up projection with SiLU-and-mul in the epilogue (each program
reads gate row n and up row I + n). Under PDL (kernels/pdl.py) the first weight chunk is read
before waiting for the previous kernel, so the weight stream starts during that kernel's tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import pdl


@triton.jit
def _load_w(rows_ptr, cols, K, EVEN_K: tl.constexpr):
    """One [BLOCK_N, BLOCK_K] chunk of W, read once per step: evict-first."""
    if EVEN_K:
        w = tl.load(rows_ptr + cols[None, :], eviction_policy="evict_first")
    else:
        w = tl.load(
            rows_ptr + cols[None, :],
            mask=(cols < K)[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
    return w


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K]
    w_ptr,  # [N, K] ([2N, K] with SILU_MUL), rows of stride_w
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
    SILU_MUL: tl.constexpr,  # W = [gate; up]: out[n] = silu(x . W[n]) * (x . W[N + n])
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = tl.where(row_ok, rows, 0)  # out-of-range rows re-read row 0; never stored
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    up_rows = w_ptr + (rows + N).to(tl.int64)[:, None] * stride_w  # read only with SILU_MUL
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # The first weight chunk is loaded before waiting for x (W is never written by a kernel):
    # under PDL it streams in while the previous kernel finishes.
    cols = tl.arange(0, BLOCK_K)
    w = _load_w(w_rows, cols, K, EVEN_K)
    if SILU_MUL:
        u = _load_w(up_rows, cols, K, EVEN_K)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    acc = w.to(tl.float32) * x  # [BLOCK_N, BLOCK_K]
    if SILU_MUL:
        acc_up = u.to(tl.float32) * x
    for start in range(BLOCK_K, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + cols).to(tl.float32)[None, :]
        else:
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
        acc += _load_w(w_rows, cols, K, EVEN_K).to(tl.float32) * x
        if SILU_MUL:
            acc_up += _load_w(up_rows, cols, K, EVEN_K).to(tl.float32) * x
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if SILU_MUL:
        # Rounded as the unfused path rounds: gate and up to the output dtype, then the product.
        gate = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = tl.sum(acc_up, axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


def gemv_config(n: int, k: int) -> GemvConfig:
    """Launch shape for W [n, k], from sweeps on an H100 over Llama-3-8B's shapes (block_n 1-16,
    block_k 512-2048, 2-8 warps), timed as decode runs them: 24 layers of (RMSNorm -> GEMV),
    distinct weights per layer, replayed from one CUDA graph with PDL; us per call, ours vs
    cuBLAS: qkv 6144x4096 17.6 vs 22.7, o 4096x4096 12.2 vs 16.7, down 4096x14336 40.6 vs 45.8,
    gate_up 28672x4096 (with SiLU-and-mul) 75.7 vs 83.5; lm_head 128256x4096 332 vs 373
    (timed alone). Up to ~60M elements, four rows per program and long K chunks over 8 warps;
    the big ones, one row per program."""
    if n * k <= 64 * 2**20:
        block_n, block_k, warps = 4, 2048, 8
    else:
        block_n, block_k, warps = 1, 2048, 4
    return GemvConfig(
        block_n=min(block_n, triton.next_power_of_2(n)),
        block_k=min(block_k, triton.next_power_of_2(k)),
        num_warps=warps,
    )


def gemv_silu_mul_config(n2: int, k: int) -> GemvConfig:
    """Launch shape for a [gate; up] weight of 2I rows: each program reads block_n gate rows
    and as many up rows, so it takes half the rows per program of a plain GEMV of that size."""
    cfg = gemv_config(n2, k)
    return GemvConfig(max(1, cfg.block_n // 2), cfg.block_k, cfg.num_warps)


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
    return _launch(x, weight, bias, out, config or gemv_config(n, k), n, silu_mul=False)


def gemv_silu_mul(
    x: torch.Tensor,  # [1, K]
    weight: torch.Tensor,  # [2I, K]: the MLP's merged gate_up projection
    out: torch.Tensor | None = None,  # [1, I]
    config: GemvConfig | None = None,
) -> torch.Tensor:  # [1, I] = silu(x W_gate^T) * (x W_up^T)
    """The gate_up projection with SiLU-and-mul in its epilogue: each program reads matching
    gate and up rows, so the [1, 2I] intermediate and one kernel per layer disappear."""
    n2, k = weight.shape
    assert n2 % 2 == 0, "gate_up weight must have 2I rows"
    return _launch(x, weight, None, out, config or gemv_silu_mul_config(n2, k), n2 // 2, True)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    cfg: GemvConfig,
    n: int,  # output length
    silu_mul: bool,
) -> torch.Tensor:
    k = weight.shape[1]
    assert x.shape == (1, k) and x.stride(-1) == 1 and weight.stride(1) == 1, (x.shape, k)
    if out is None:
        out = x.new_empty(1, n)
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
        SILU_MUL=silu_mul,
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


def gemv_silu_mul_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    gate, up = gemv_ref(x, weight).float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)
