"""Paged prefill/extend attention with GQA over a ragged batch (Triton); torch reference below.

Request i has `extend_lens[i]` new tokens at positions prefix_lens[i] ... and q holds every
request's new tokens back to back. The new tokens' K/V are already in the pool, so all keys are
read through `kv_slots[i, :prefix + extend]`; a query at position p sees keys 0..p (causal).

Grid: (B, Hkv, cdiv(max_extend, BLOCK_M)). One program takes BLOCK_M consecutive new tokens of
one request times the G = H / Hkv query heads sharing one KV head, as one [BLOCK_M * G, D] tile
(row r = token r // G, head r % G), so each K/V block is loaded once for the whole group. It
walks the request's keys in BLOCK_N blocks up to its last query's position with an online
softmax. Programs past a request's extend length exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# Tile for D <= 128, from a sweep on an H100 (bf16, Llama-3-8B heads, prefill 4096 and chunked
# extends): 3 stages of K/V loads in flight matter most; 64 rows x 64 keys beats 128-row tiles.
_TILE = {"rows": 64, "block_n": 64, "warps": 4, "stages": 3}


@triton.jit
def _attend_blocks(
    acc,
    m_i,
    l_i,
    q,  # [R, D]
    q_pos,  # [R]
    k_pool_ptr,
    v_pool_ptr,
    slot_row_ptr,  # this request's kv_slots row
    head_off,  # kv_head * stride_pool_head
    stride_pool_slot,
    offs_d,
    mask_d,
    lo,
    hi,
    qk_scale,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,  # False: every key in [lo, hi) is visible to every row
    PRECISION: tl.constexpr,
):
    """Online softmax over keys [lo, hi) in BLOCK_N blocks; returns (acc, m_i, l_i)."""
    for block_start in range(lo, hi, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        slots = tl.load(slot_row_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_off = slots[:, None] * stride_pool_slot + head_off + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_pool_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)  # [N, D]
        v = tl.load(v_pool_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)  # fp8 pools
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [R, N]
        if CAUSAL:
            visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _extend_kernel(
    q_ptr,
    k_pool_ptr,
    v_pool_ptr,
    out_ptr,
    slots_ptr,
    prefix_lens_ptr,
    extend_lens_ptr,
    q_starts_ptr,  # [B]: row of each request's first new token in q
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_pool_slot,
    stride_pool_head,
    stride_slots,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    group,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,  # group padded to a power of two
    BLOCK_M: tl.constexpr,  # tokens per program; rows = BLOCK_M * BLOCK_G
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    req = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    # The last query blocks see the most keys: launch them first for a better tail.
    first_token = (tl.num_programs(2) - 1 - tl.program_id(2)) * BLOCK_M
    extend_len = tl.load(extend_lens_ptr + req)
    if first_token >= extend_len:
        return
    prefix_len = tl.load(prefix_lens_ptr + req)
    q_start = tl.load(q_starts_ptr + req)

    rows = tl.arange(0, BLOCK_M * BLOCK_G)
    token = first_token + rows // BLOCK_G  # index among this request's new tokens
    head = kv_head * group + rows % BLOCK_G
    mask_row = (token < extend_len) & (rows % BLOCK_G < group)
    q_pos = prefix_len + token  # [R] absolute position of each row's token
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + token).to(tl.int64)
    q_ptrs = q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_row[:, None] & mask_d[None, :], other=0.0)  # [R, D]

    m_i = tl.full([BLOCK_M * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], tl.float32)
    slot_row_ptr = slots_ptr + req * stride_slots
    head_off = kv_head * stride_pool_head
    # Whole blocks of keys up to the first query's position are visible to every row: no mask.
    # The rest, up to the last query's position (later keys are hidden from every row), are
    # masked causally. Key 0 is always visible, so every valid row's max stays finite; padded
    # rows may go NaN but are never stored.
    open_end = (prefix_len + first_token + 1) // BLOCK_N * BLOCK_N
    kv_end = prefix_len + tl.minimum(first_token + BLOCK_M, extend_len)
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, q_pos, k_pool_ptr, v_pool_ptr, slot_row_ptr, head_off,
        stride_pool_slot, offs_d, mask_d, 0, open_end, qk_scale,
        BLOCK_N=BLOCK_N, CAUSAL=False, PRECISION=PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, q_pos, k_pool_ptr, v_pool_ptr, slot_row_ptr, head_off,
        stride_pool_slot, offs_d, mask_d, open_end, kv_end, qk_scale,
        BLOCK_N=BLOCK_N, CAUSAL=True, PRECISION=PRECISION,
    )  # fmt: skip

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_row[:, None] & mask_d[None, :])


def extend_attention(
    q: torch.Tensor,  # [T, H, D], requests' new tokens back to back
    k_pool: torch.Tensor,  # [num_slots, Hkv, D]
    v_pool: torch.Tensor,  # [num_slots, Hkv, D]
    kv_slots: torch.Tensor,  # [B, max_kv] int; row i covers prefix_lens[i] + extend_lens[i]
    prefix_lens: torch.Tensor,  # [B] int
    extend_lens: torch.Tensor,  # [B] int, sum == T
    scale: float,
    max_extend: int | None = None,  # max(extend_lens), if the caller knows it without a sync
    q_starts: torch.Tensor | None = None,  # [B] exclusive cumsum of extend_lens, likewise
    out: torch.Tensor | None = None,  # [T, H, D]
) -> torch.Tensor:  # [T, H, D]
    tokens, num_heads, head_dim = q.shape
    batch = extend_lens.shape[0]
    num_kv_heads = k_pool.shape[1]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert k_pool.shape[2] == head_dim and k_pool.stride() == v_pool.stride()
    assert q.stride(-1) == 1 and k_pool.stride(-1) == 1 and kv_slots.stride(-1) == 1
    out = q.new_empty(tokens, num_heads, head_dim) if out is None else out
    if tokens == 0 or batch == 0:
        return out
    if max_extend is None:
        max_extend = int(extend_lens.max())
    if q_starts is None:
        q_starts = torch.cumsum(extend_lens, 0) - extend_lens
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_d = triton.next_power_of_2(head_dim)
    wide = block_d > 128  # halve the tile and the pipeline so K/V stages fit shared memory
    rows = _TILE["rows"] // 2 if wide else _TILE["rows"]
    # Short extends (spec verify, small chunks) get a smaller tile; tl.dot wants >= 16 rows.
    block_m = max(rows // block_g, 1)
    block_m = min(block_m, max(triton.next_power_of_2(max_extend), triton.cdiv(16, block_g)))
    grid = (batch, num_kv_heads, triton.cdiv(max_extend, block_m))
    _extend_kernel[grid](
        q,
        k_pool,
        v_pool,
        out,
        kv_slots,
        prefix_lens,
        extend_lens,
        q_starts,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        kv_slots.stride(0),
        scale * _LOG2E,
        group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_G=block_g,
        BLOCK_M=block_m,
        BLOCK_N=_TILE["block_n"],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=_TILE["warps"],
        num_stages=2 if wide else _TILE["stages"],
    )
    return out


def extend_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    kv_slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One request at a time, fp32 softmax with an explicit causal mask."""
    group = q.shape[1] // k_pool.shape[1]
    out = torch.empty_like(q)
    start = 0
    for i in range(extend_lens.shape[0]):
        prefix, extend = int(prefix_lens[i]), int(extend_lens[i])
        slots = kv_slots[i, : prefix + extend]
        keys = k_pool[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        values = v_pool[slots].float().repeat_interleave(group, dim=1)
        queries = q[start : start + extend].float()  # [E, H, D]
        scores = torch.einsum("ehd,lhd->hel", queries, keys) * scale
        q_pos = prefix + torch.arange(extend, device=q.device)
        visible = torch.arange(prefix + extend, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start : start + extend] = torch.einsum("hel,lhd->ehd", scores.softmax(-1), values).to(
            q.dtype
        )
        start += extend
    return out
