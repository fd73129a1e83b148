"""y = x W^T (+ b) for 2-64 rows of x (Triton, tensor cores): batched decode's projections.

A decode step at batch 8-64 multiplies a few-row activation by every weight once: still bound by
reading W, not by the tensor cores. Each program owns BLOCK_N whole rows of W [N, K] (row-major,
as nn.Linear stores it) and all of x's rows, walks K in BLOCK_K chunks (software-pipelined,
`num_stages` deep) and multiplies on the tensor cores; x stays in L2 while W streams past once.
Grid: (cdiv(N, BLOCK_N) * cdiv(M, BLOCK_M) * SPLIT_K,).

Wide W (gate_up, LM head: thousands of N blocks) keeps every SM streaming. Per call on an H100,
64 rows: gate_up 28672x4096 85-86 us against cuBLAS's 88.5-89.6, LM head 128256x4096 360 us
(2.9 TB/s) against 387-393. The MLP's gate_up can also apply SiLU-and-mul in the epilogue
(`skinny_gemm_silu_mul`: matching gate and up rows per program), one kernel and one [M, 2I]
round trip fewer per layer. Narrow W (o, down: a few dozen N blocks) needs more programs than
N blocks: K is cut into SPLIT_K slices whose fp32 partial sums a second, element-wise kernel
adds (`_split_sum_kernel`; deterministic, unlike atomics). See NARROW_MAX_N for which shapes.
Used, like the batch-1 GEMV, only inside CUDA graphs, where a Triton launch costs no host time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl
from .skinny_table import SkinnyConfig, table_on


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K], rows of stride_x
    w_ptr,  # [N, K], rows of stride_w
    b_ptr,  # [N] or unused
    out_ptr,  # [M, N], rows of stride_o; with SPLIT_K > 1 fp32 partials [SPLIT_K, M, N]
    M,
    N,  # output columns (SILU_MUL: W holds 2N rows, gate then up)
    K,
    k_per_split,  # a multiple of BLOCK_K; K when SPLIT_K == 1
    stride_x,
    stride_w,
    stride_o,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # every split's K range is whole BLOCK_K chunks: no K masks
    SPLIT_K: tl.constexpr,
    SILU_MUL: tl.constexpr,  # out = silu(x Wg^T) * (x Wu^T), W = [Wg; Wu]; SPLIT_K == 1
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,  # see kernels/pdl.py
):
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_s = pid % SPLIT_K
    pid_nm = pid // SPLIT_K
    pid_n = pid_nm // num_m
    pid_m = pid_nm % num_m
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows_m < M
    n_ok = rows_n < N
    w_rows = tl.where(n_ok, rows_n, 0)  # out-of-range rows re-read row 0; never stored
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    cols = k_start + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m.to(tl.int64)[:, None] * stride_x + cols[None, :]
    w_ptrs = w_ptr + w_rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # SILU_MUL only
    up_offset = N.to(tl.int64) * stride_w
    for start in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            if SILU_MUL:
                w_up = tl.load(w_ptrs + up_offset, eviction_policy="evict_first")
        else:
            k_ok = (start - k_start + cols) < k_end
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
            if SILU_MUL:
                w_up = tl.load(
                    w_ptrs + up_offset, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first"
                )
        acc = tl.dot(x, w.T, acc)  # [BLOCK_M, BLOCK_N]
        if SILU_MUL:
            acc_up = tl.dot(x, w_up.T, acc_up)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SILU_MUL:  # rounded as the unfused path rounds: gate and up to out's dtype, then the product
        gate = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * up
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + w_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows_m.to(tl.int64)[:, None] * stride_o + rows_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:  # this K slice's partial sums; _split_sum_kernel adds the slices
        part = out_ptr + (pid_s * M + rows_m.to(tl.int64))[:, None] * N + rows_n[None, :]
        tl.store(part, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _split_sum_kernel(
    part_ptr,  # [SPLIT_K, M, N] fp32
    b_ptr,  # [N] or unused
    out_ptr,  # [M, N], rows of stride_o
    M,
    N,
    stride_o,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat over [M, N]
    ok = idx < M * N
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = tl.load(part_ptr + idx, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + idx, mask=ok, other=0.0)
    col = idx % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + col, mask=ok, other=0.0).to(tl.float32)
    row = idx // N
    tl.store(out_ptr + row.to(tl.int64) * stride_o + col, acc.to(out_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class SplitPartials:
    """A split-K product not yet summed: what `skinny_gemm(..., defer_sum=True)` returns when it
    cut K, for the next kernel to finish (kernels/norm.py's split_add_rms_norm) or `finish`."""

    parts: torch.Tensor  # [S, M, N] fp32
    bias: torch.Tensor | None  # [N]
    dtype: torch.dtype  # of the product

    def finish(self) -> torch.Tensor:  # [M, N]
        """The product itself, summed by the GEMM's own summing kernel."""
        _, m, n = self.parts.shape
        out = torch.empty(m, n, dtype=self.dtype, device=self.parts.device)
        _sum_partials(self.parts, self.bias, out)
        return out


# Rows of x this kernel takes; outside it cuBLAS (one row: kernels/gemv.py).
MIN_ROWS, MAX_ROWS = 2, 64
# Wide weights (gate_up, LM head: thousands of N blocks) at any of those rows.
WIDE_ROWS = 16384
# Narrow weights that project back to a hidden size of at most 4,096 from at least as many
# inputs (o, down) at 17-64 rows, with K in 2-4 slices so that ~2 programs run per SM. On an
# H200 (chains of 32 distinct weights in a CUDA graph, µs per call, ours vs cuBLAS): o 11.7 vs
# 12.2 at 64 rows and 11.7 vs 14.2 at 32; down 32.2 vs 35.9 and 31.3 vs 33.0. qkv (6,144 rows)
# did not gain (16.7 vs 16.3 at 64 rows) and stays with cuBLAS, as do fewer rows (not swept).
NARROW_MAX_N, NARROW_MIN_ROWS = 4096, 17
# `LLMCONSOLE_SKINNY_GEMM` at start-up, for A/B runs: "0" keeps cuBLAS for all these products,
# "wide" takes only the wide ones, without the fused SiLU-and-mul (the 2026-11-28 kernel).
MODE = os.environ.get("LLMCONSOLE_SKINNY_GEMM", "1")
SWITCHED_ON = MODE != "0"
# Split-K products of at most this many slices may leave their sum to the next RMSNorm
# (`defer_sum`; kernels/norm.py, split_add_rms_norm), one kernel fewer per o and down. That
# kernel has one program per row, each reading every slice, so it pays at 33-64 rows (two
# slices) but not at 17-32 (four, and half the programs). H200, `bench offline` decode step at
# C=64: 6.80 / 6.83 ms against 6.86 / 6.88 summing first; C=32 with four slices deferred: 5.77
# against 5.70. `LLMCONSOLE_DEFER_SUM=0` at start-up turns it off.
DEFER_MAX_SPLIT = 2
DEFER_SUM = os.environ.get("LLMCONSOLE_DEFER_SUM", "1") != "0"


def _narrow(m: int, n: int, k: int) -> bool:
    return MODE == "1" and m >= NARROW_MIN_ROWS and n <= NARROW_MAX_N <= k and n <= k


def skinny_config(m: int, n: int, k: int) -> SkinnyConfig:
    """Launch shape for x [m, k] W[n, k]^T. All of x's rows in one block (16 at least, the
    tensor cores' smallest tile). Wide W: 64- or 128-row N blocks, 128-column K chunks three
    deep, picked from a sweep on an H100 (N blocks 16-128, K chunks 64-256, 4/8 warps, 3-5
    stages) over Llama-3-8B's gate_up and LM head at 16 / 64 / 128 rows. Narrow W (see
    NARROW_MAX_N): K split 2-4 ways, from a sweep on an H200 (N blocks 16-128, K chunks
    128/256, 3-5 stages, splits 1-8) at 32 and 64 rows."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_k = min(128, triton.next_power_of_2(k))
    if n < WIDE_ROWS and _narrow(m, n, k):
        if block_m > 32:
            return SkinnyConfig(block_m, 64, block_k, 4, 4, split_k=2)
        return SkinnyConfig(block_m, 128, block_k, 4, 4, split_k=4)
    block_n = 128 if m > 32 else 64
    return SkinnyConfig(block_m, block_n, block_k, 4, 3)


def silu_mul_config(m: int, n: int, k: int) -> SkinnyConfig:
    """Launch shape for the fused gate_up + SiLU-and-mul (n: output columns, W has 2n rows):
    64 columns (128 W rows) per program, 128-column K chunks four deep. From a sweep on an H200
    (Llama-3-8B's gate_up, chains of 32 in a CUDA graph, µs per call): 61.9 / 60.0 / 62.3 at
    64 / 32 / 16 rows, against 65.1 / 61.6 / 71.7 for the wide skinny GEMM then the SiLU-and-mul
    kernel and 68.2 / 66.3 / 65.8 for cuBLAS then that kernel."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    return SkinnyConfig(block_m, 64, min(128, triton.next_power_of_2(k)), 4, 4)


def _layout_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A few rows of x (unit column stride) against a weight with contiguous rows, on CUDA, in
    one half-precision dtype."""
    return (
        SWITCHED_ON
        and x.is_cuda
        and x.dim() == 2
        and x.shape[0] >= MIN_ROWS
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and x.dtype == weight.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
    )


def tuned_config(op: str, x: torch.Tensor, weight: torch.Tensor) -> SkinnyConfig | None:
    """The shape this card's table (kernels/skinny_table.py) measured for `op` at x's rows."""
    if MODE != "1" or not x.is_cuda:
        return None
    table = table_on(x.device)
    if table is None:
        return None
    return table.lookup(op, x.shape[0], weight.shape[0], weight.shape[1])


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x and W in a layout this kernel takes, of a shape it beats cuBLAS on: wide or narrow at
    2-64 rows (the built-in rules), or any shape and rows this card's table holds."""
    if not _layout_ok(x, weight):
        return False
    m, (n, k) = x.shape[0], weight.shape
    if m <= MAX_ROWS and (n >= WIDE_ROWS or _narrow(m, n, k)):
        return True
    return tuned_config("gemm", x, weight) is not None


def supports_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `skinny_gemm_silu_mul` takes this merged [gate; up] weight."""
    if MODE != "1" or weight.shape[0] % 2 or not _layout_ok(x, weight):
        return False
    if x.shape[0] <= MAX_ROWS and weight.shape[0] >= WIDE_ROWS:
        return True
    return tuned_config("silu_mul", x, weight) is not None


def skinny_gemm_silu_mul(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [2N, K]: gate rows, then up rows
    out: torch.Tensor | None = None,  # [M, N]
    config: SkinnyConfig | None = None,
) -> torch.Tensor:  # [M, N] = silu(x Wg^T) * x Wu^T
    """The MLP's gate_up projection and SiLU-and-mul in one kernel: each program owns matching
    gate and up rows, so the [M, 2N] projection never goes to memory."""
    m, k = x.shape
    n = weight.shape[0] // 2
    cfg = config or tuned_config("silu_mul", x, weight) or silu_mul_config(m, n, k)
    assert cfg.split_k == 1, "SiLU does not distribute over K slices"
    result = _launch(x, weight, None, out, cfg, n, silu_mul=True)
    assert isinstance(result, torch.Tensor)
    return result


def skinny_gemm(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [M, N]
    config: SkinnyConfig | None = None,
    defer_sum: bool = False,
) -> torch.Tensor | SplitPartials:  # [M, N]
    """x W^T (+ b). With `defer_sum` (and no `out`), a product whose K was cut into 2 to
    DEFER_MAX_SPLIT slices comes back as its SplitPartials, unsummed, for a fused consumer."""
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or tuned_config("gemm", x, weight) or skinny_config(m, n, k)
    return _launch(x, weight, bias, out, cfg, n, silu_mul=False, defer_sum=defer_sum)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    cfg: SkinnyConfig,
    n: int,  # output columns
    silu_mul: bool,
    defer_sum: bool = False,
) -> torch.Tensor | SplitPartials:
    m, k = x.shape
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1, (x.shape, k)
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # no empty slices
    defer = defer_sum and out is None and 1 < split <= DEFER_MAX_SPLIT
    if out is None and not defer:
        out = x.new_empty(m, n)
    assert out is None or (out.shape == (m, n) and out.stride(1) == 1)
    use_pdl = pdl.enabled(x)
    if split == 1:
        target = out
    else:
        target = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    _skinny_gemm_kernel[(tiles * split,)](
        x,
        weight,
        bias if bias is not None else weight,
        target,
        m,
        n,
        k,
        k_per_split,
        x.stride(0),
        weight.stride(0),
        target.stride(-2),
        HAS_BIAS=bias is not None,
        EVEN_K=k % k_per_split == 0 and k_per_split % cfg.block_k == 0,
        SPLIT_K=split,
        SILU_MUL=silu_mul,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        USE_PDL=use_pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl.launch_options(use_pdl),
    )
    if defer:
        return SplitPartials(target, bias, x.dtype)
    assert out is not None
    if split > 1:
        _sum_partials(target, bias, out)
    return out


def _sum_partials(
    parts: torch.Tensor,  # [S, M, N] fp32
    bias: torch.Tensor | None,  # [N]
    out: torch.Tensor,  # [M, N]
) -> None:
    split, m, n = parts.shape
    block = 1024
    use_pdl = pdl.enabled(parts)
    _split_sum_kernel[(triton.cdiv(m * n, block),)](
        parts,
        bias if bias is not None else parts,
        out,
        m,
        n,
        out.stride(0),
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        BLOCK=block,
        USE_PDL=use_pdl,
        num_warps=4,
        **pdl.launch_options(use_pdl),
    )
