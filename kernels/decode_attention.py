"""Paged decode attention with GQA, split-KV (flash-decoding), in Triton; torch reference below.

Every request has one new query token. Stage 1, grid (B, Hkv, num_splits): one program takes the
G = H / Hkv query heads that share one KV head (padded to >= 16 rows for tl.dot) and one slice of
the request's KV positions, gathers K/V rows through `kv_slots`, and writes its partial softmax
(normalised output and log2-sum-exp per head) to a fp32 workspace. KV is read once per group.
Stage 2, grid (B, H): merges the splits. Splitting is what lets batch 1 with 4k tokens of KV
fill an H100's 132 SMs; large batches already fill them and get 1-4 splits, whichever leaves the
last wave of programs least idle (`decode_num_splits`).

Each request cuts its own KV length into `num_splits` slices (on the device), so a launch with a
fixed `num_splits` suits any lengths: that is what a CUDA graph replays. With `kv_rows`, request
i reads its slots from row `kv_rows[i]` of `kv_slots` (the runner's slot table) with no gather.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl

_LOG2E = 1.4426950408889634
# From a sweep on an H100 (bf16, H=32, Hkv=8, D=128): ~2.9 TB/s at batch 64 x 4096 tokens.
_TILE = {"block_n": 64, "warps": 4, "stages": 3}
# Batches of 32+ pipeline two KV blocks deep instead of three. A sweep on an H200 (Llama-3-8B
# heads, 1,056 tokens per request, 32 layers' pools in one CUDA graph; block_n 32-128, 4/8
# warps, 2-4 stages, 1-4 splits), µs per layer, 2 stages vs 3: batch 64 70.1 vs 75.7 (3.95 vs
# 3.65 TB/s), 128 141.1 vs 143.6, 256 under 282 vs 289.6. Smaller batches were not swept.
_LARGE_BATCH, _LARGE_BATCH_STAGES = 32, 2


@triton.jit
def _decode_stage1(
    q_ptr,
    k_pool_ptr,
    v_pool_ptr,
    slots_ptr,
    rows_ptr,  # [B] row of slots_ptr per request; read only when HAS_ROWS
    kv_lens_ptr,
    mid_o_ptr,  # [B, H, S, D] fp32
    mid_lse_ptr,  # [B, H, S] fp32
    stride_qb,
    stride_qh,
    stride_pool_slot,
    stride_pool_head,
    stride_slots,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    num_splits,
    group,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see kernels/pdl.py: everything below may read what the last kernel wrote
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    req = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_lens_ptr + req)
    if HAS_ROWS:
        slot_row = tl.load(rows_ptr + req).to(tl.int64)
    else:
        slot_row = req
    # Whole BLOCK_Ns per split, so only a request's last block is ragged.
    split_size = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_size
    end = tl.minimum(start + split_size, kv_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_g
    mask_g = offs_g < group
    mask_d = offs_d < HEAD_DIM
    q_ptrs = q_ptr + req * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [G, D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for block_start in range(start, end, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(slots_ptr + slot_row * stride_slots + offs_n, mask=mask_n, other=0)
        kv_off = (
            slots.to(tl.int64)[:, None] * stride_pool_slot
            + kv_head * stride_pool_head
            + offs_d[None, :]
        )
        kv_mask = mask_n[:, None] & mask_d[None, :]
        # An fp8 pool (--kv-cache-dtype) is widened to the query's dtype as it is read.
        k = tl.load(k_pool_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)  # [N, D]
        v = tl.load(v_pool_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G, N]
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        # The first block of a non-empty split has a valid column, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # An empty split (past this request's kv_len) reports lse = -inf and weighs nothing.
    has_kv = l_i > 0
    out = acc / tl.where(has_kv, l_i, 1.0)[:, None]
    lse = tl.where(has_kv, m_i + tl.log2(tl.where(has_kv, l_i, 1.0)), float("-inf"))
    row = (req * tl.num_programs(1) * group + heads) * num_splits + split  # [G] in [B*H*S]
    tl.store(mid_lse_ptr + row, lse, mask=mask_g)
    mid_ptrs = mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(mid_ptrs, out, mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def _decode_stage2(
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    num_heads,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see kernels/pdl.py: everything below may read what the last kernel wrote
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    row = (req * num_heads + head) * num_splits
    lse = tl.load(mid_lse_ptr + row + offs_s, mask=mask_s, other=float("-inf"))  # [S]
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no KV at all (a padding row): output zeros
    w = tl.exp2(lse - m)
    denom = tl.sum(w, axis=0)
    mid_ptrs = mid_o_ptr + (row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(mid_ptrs, mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # [S, D]
    out = tl.sum(o * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    out_ptrs = out_ptr + req * stride_ob + head * stride_oh + offs_d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_d)


# Stage 1 as compiled for sm_90 at batch 32+ (Triton 3.x; block_n 64, 4 warps, 2 stages, the
# pool and strides 16-byte aligned, as launches specialise them): 80 registers a thread and 38.9
# KB of shared memory, so 5 programs fit an H100 / H200 SM (shared memory is the limit).
_STAGE1_REGS, _STAGE1_SMEM = 80, 38912
# Wave model for large batches, fitted to a sweep on an H100 (Llama-3-8B heads, KV 1,024, 8
# layers' pools in one graph; µs per layer at splits 1 / 2 / 3 / 4): batch 64 100.1 / 102.7 /
# 106.2 / 109.5, 96 175.5 / 155.0 / 154.6 / 155.5, 128 197.8 / 209.4 / 201.7 / 208.4, 256
# 408.1 / 393.8 / 401.7 / 406.3. A last wave under TAIL_FLOOR full takes as long as one that
# full (too few programs to keep HBM busy); each extra split costs SPLIT_COST (q re-read, partial
# results, shorter programs). Batch 96 at one split is 768 programs for 660 slots: a 16% tail.
# In the engine (graph steps, one H100 process, 2026-12-07) the rule took batch 96 from 12.50 to
# 11.67-11.76 ms and 256 from 21.93 to 21.21-21.43. Time attention with stage 2 or a product after
# it: back to back with PDL, the next layer's stage 1 fills the tail and hides what it is for.
_TAIL_FLOOR, _SPLIT_COST, _MAX_WAVE_SPLITS = 0.3, 0.025, 4


def stage1_resident(
    regs_per_sm: int = 65536,
    smem_per_sm: int = 233472,
    threads_per_sm: int = 2048,
    regs: int = _STAGE1_REGS,
    smem: int = _STAGE1_SMEM,
) -> int:
    """Stage-1 programs one SM holds at once (batch 32+ tile, `regs` a thread and `smem` bytes
    as compiled) under the card's limits (an H100's by default); the driver keeps 1 KB of shared
    memory per block."""
    threads = _TILE["warps"] * 32
    by_regs = regs_per_sm // (regs * threads)
    by_smem = smem_per_sm // (smem + 1024)
    return max(1, min(by_regs, by_smem, threads_per_sm // threads))


def wave_cost(programs: int, slots: int) -> float:
    """Time of `programs` equal memory-bound programs over `slots` resident at once, relative to
    the same bytes spread perfectly: a last wave fuller than _TAIL_FLOOR runs at full rate."""
    waves = programs / slots
    whole = int(waves)
    tail = waves - whole
    return (whole + (max(tail, _TAIL_FLOOR) if tail > 0 else 0.0)) / waves


def decode_num_splits(
    batch_size: int, num_kv_heads: int, max_kv_len: int, num_sms: int, resident: int = 5
) -> int:
    """KV splits per request. Small batches: enough for ~2 programs per SM, each at least one
    BLOCK_N of KV, at most 64. Batches that fill the SMs on their own (B x Hkv >= 2 x SMs): 1-4
    splits, whichever leaves the least idle tail in the last wave of programs (`wave_cost`,
    `resident` programs per SM; see `stage1_resident`)."""
    programs = max(batch_size * num_kv_heads, 1)
    wanted = triton.cdiv(2 * num_sms, programs)
    most = triton.cdiv(max_kv_len, _TILE["block_n"])
    if wanted > 1:
        return max(1, min(wanted, most, 64))
    slots = num_sms * resident
    options = range(1, max(1, min(_MAX_WAVE_SPLITS, most)) + 1)
    return min(options, key=lambda s: wave_cost(programs * s, slots) * (1 + _SPLIT_COST * (s - 1)))


def decode_workspace(
    batch: int, num_heads: int, num_splits: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:  # (mid_o [B, H, S, D], mid_lse [B, H, S]), fp32
    """Stage 1's partial results; allocate once per step and share across layers."""
    mid_o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    return mid_o, torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device)


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_pool: torch.Tensor,  # [num_slots, Hkv, D]
    v_pool: torch.Tensor,  # [num_slots, Hkv, D]
    kv_slots: torch.Tensor,  # [B, max_kv] int, padded with slot 0 ([R, max_kv] with kv_rows)
    kv_lens: torch.Tensor,  # [B] int, <= max_kv
    scale: float,
    num_splits: int | None = None,  # fix it to replay the launch in a CUDA graph
    out: torch.Tensor | None = None,  # [B, H, D]
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,  # from decode_workspace
    kv_rows: torch.Tensor | None = None,  # [B] int: request i's slots are kv_slots[kv_rows[i]]
) -> torch.Tensor:  # [B, H, D]
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert k_pool.shape[2] == head_dim and k_pool.stride() == v_pool.stride()
    assert q.stride(-1) == 1 and k_pool.stride(-1) == 1 and kv_slots.stride(-1) == 1
    group = num_heads // num_kv_heads
    max_kv = kv_slots.shape[1]
    block_n = _TILE["block_n"]
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = decode_num_splits(batch, num_kv_heads, max_kv, sms)
    out = q.new_empty(batch, num_heads, head_dim) if out is None else out
    if batch == 0:
        return out
    if workspace is None:
        workspace = decode_workspace(batch, num_heads, num_splits, head_dim, q.device)
    mid_o, mid_lse = workspace
    assert mid_o.shape == (batch, num_heads, num_splits, head_dim) and mid_o.is_contiguous()
    assert mid_lse.shape == (batch, num_heads, num_splits) and mid_lse.is_contiguous()
    block_d = triton.next_power_of_2(head_dim)
    use_pdl = pdl.enabled(q)
    _decode_stage1[(batch, num_kv_heads, num_splits)](
        q,
        k_pool,
        v_pool,
        kv_slots,
        kv_rows if kv_rows is not None else kv_lens,
        kv_lens,
        mid_o,
        mid_lse,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        kv_slots.stride(0),
        scale * _LOG2E,
        num_splits,
        group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_ROWS=kv_rows is not None,
        USE_PDL=use_pdl,
        num_warps=_TILE["warps"],
        num_stages=_LARGE_BATCH_STAGES if batch >= _LARGE_BATCH else _TILE["stages"],
        **pdl.launch_options(use_pdl),
    )
    _decode_stage2[(batch, num_heads)](
        mid_o,
        mid_lse,
        out,
        out.stride(0),
        out.stride(1),
        num_heads,
        num_splits,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(num_splits),
        USE_PDL=use_pdl,
        num_warps=4,
        **pdl.launch_options(use_pdl),
    )
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    kv_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One request at a time, fp32 softmax: slow and obviously right."""
    group = q.shape[1] // k_pool.shape[1]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        row = i if kv_rows is None else int(kv_rows[i])
        slots = kv_slots[row, : int(kv_lens[i])]
        keys = k_pool[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        values = v_pool[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[i].float(), keys) * scale
        out[i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values).to(q.dtype)
    return out
