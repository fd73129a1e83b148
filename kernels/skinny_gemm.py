"""y = x W^T (+ b) for 2-64 rows of x and a wide W (Triton, tensor cores): batched decode's
gate_up projection and LM head.

A decode step at batch 8-64 multiplies a few-row activation by every weight once: still bound by
reading W, not by the tensor cores. Each program owns BLOCK_N whole rows of W [N, K] (row-major,
as nn.Linear stores it) and all of x's rows, walks K in BLOCK_K chunks (software-pipelined,
`num_stages` deep) and multiplies on the tensor cores; x stays in L2 while W streams past once.
Grid: (cdiv(N, BLOCK_N) * cdiv(M, BLOCK_M),), the M blocks of one N block adjacent.

Where it pays: W with thousands of N blocks. Per call on an H100, 64 rows: gate_up 28672x4096
85-86 us against cuBLAS's 88.5-89.6, LM head 128256x4096 360 us (2.9 TB/s) against 387-393.
The narrow weights (qkv, o, down: a few dozen N blocks) stay with cuBLAS (see WIDE_ROWS).
Used, like the batch-1 GEMV, only inside CUDA graphs, where a Triton launch costs no host time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K], rows of stride_x
    w_ptr,  # [N, K], rows of stride_w
    b_ptr,  # [N] or unused
    out_ptr,  # [M, N], rows of stride_o
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_o,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks on the K axis
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,  # see kernels/pdl.py
):
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = pid // num_m
    pid_m = pid % num_m
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows_m < M
    n_ok = rows_n < N
    w_rows = tl.where(n_ok, rows_n, 0)  # out-of-range rows re-read row 0; never stored
    cols = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m.to(tl.int64)[:, None] * stride_x + cols[None, :]
    w_ptrs = w_ptr + w_rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            k_ok = (start + cols) < K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        acc = tl.dot(x, w.T, acc)  # [BLOCK_M, BLOCK_N]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + w_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows_m.to(tl.int64)[:, None] * stride_o + rows_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class SkinnyConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Rows of x this kernel takes; outside it cuBLAS (one row: kernels/gemv.py).
MIN_ROWS, MAX_ROWS = 2, 64
# Only wide weights (gate_up, LM head: thousands of N blocks): with fewer rows (qkv, o, down;
# a few dozen N blocks) our kernel, split-K or not, made the decode step slower than cuBLAS in
# CUDA graphs on an H100 (batch 64: 10.4 ms against 9.3).
WIDE_ROWS = 16384
# `LLMCONSOLE_SKINNY_GEMM=0` at start-up keeps cuBLAS for these products (A/B runs).
SWITCHED_ON = os.environ.get("LLMCONSOLE_SKINNY_GEMM", "1") != "0"


def skinny_config(m: int, n: int, k: int) -> SkinnyConfig:
    """Launch shape for x [m, k] W[n, k]^T, W wide (see WIDE_ROWS): all of x's rows in one
    block (16 at least, the tensor cores' smallest tile), 64- or 128-row N blocks, 128-column
    K chunks three deep. Picked from a sweep on an H100 (N blocks 16-128, K chunks 64-256,
    4/8 warps, 3-5 stages) over Llama-3-8B's gate_up and LM head at 16 / 64 / 128 rows."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = 128 if m > 32 else 64
    return SkinnyConfig(block_m, block_n, min(128, triton.next_power_of_2(k)), 4, 3)


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A few rows of x (unit column stride) against a weight with contiguous rows, on CUDA, in
    one half-precision dtype."""
    return (
        SWITCHED_ON
        and x.is_cuda
        and x.dim() == 2
        and MIN_ROWS <= x.shape[0] <= MAX_ROWS
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and x.dtype == weight.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.shape[0] >= WIDE_ROWS
    )


def skinny_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [M, N]
    config: SkinnyConfig | None = None,
) -> torch.Tensor:  # [M, N]
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1, (x.shape, k)
    cfg = config or skinny_config(m, n, k)
    if out is None:
        out = x.new_empty(m, n)
    assert out.shape == (m, n) and out.stride(1) == 1
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    use_pdl = pdl.enabled(x)
    _skinny_gemm_kernel[(tiles,)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        USE_PDL=use_pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl.launch_options(use_pdl),
    )
    return out
