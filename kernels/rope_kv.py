"""Rotary embedding on q and k fused with the paged-KV write (Triton), with a torch reference.

Convention (core/models/llama.py): rotate-half / neox layout over the whole head dim; the angle
of pair (i, i + D/2) at position p is p * inv_freq[i], and cos/sin carry the rope attention
scale. The cache is one fp32 row per position, [cos(D/2) | sin(D/2)], built once per model.

Grid: (T,). One program rotates all H query heads of one token in place, and writes that token's
rotated K and its V (all Hkv heads) into the pool at its slot: q, k and v are read once, k is
never written back to its own buffer because attention reads K from the pool.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl


@triton.jit
def _rope_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cache_ptr,
    k_pool_ptr,
    v_pool_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache,
    stride_pool_slot,
    stride_pool_head,
    num_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # see kernels/pdl.py: everything below may read what the last kernel wrote
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + offs_d, mask=mask_d, other=0.0)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs_d, mask=mask_d, other=0.0)[None, :]

    # q: [BLOCK_H, HALF] halves, rotated in place.
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < num_heads) & mask_d[None, :]
    q_lo_ptrs = q_ptr + token * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :]
    q_lo = tl.load(q_lo_ptrs, mask=mask, other=0.0).to(tl.float32)
    q_hi = tl.load(q_lo_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_lo_ptrs, (q_lo * cos - q_hi * sin).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(q_lo_ptrs + HALF, (q_hi * cos + q_lo * sin).to(q_ptr.dtype.element_ty), mask=mask)

    # k: rotated straight into the pool; v: copied.
    offs_kh = tl.arange(0, BLOCK_HKV)
    mask_kv = (offs_kh[:, None] < num_kv_heads) & mask_d[None, :]
    k_lo_ptrs = k_ptr + token * stride_kt + offs_kh[:, None] * stride_kh + offs_d[None, :]
    k_lo = tl.load(k_lo_ptrs, mask=mask_kv, other=0.0).to(tl.float32)
    k_hi = tl.load(k_lo_ptrs + HALF, mask=mask_kv, other=0.0).to(tl.float32)
    pool_off = slot * stride_pool_slot + offs_kh[:, None] * stride_pool_head + offs_d[None, :]
    out_ty = k_pool_ptr.dtype.element_ty
    tl.store(k_pool_ptr + pool_off, (k_lo * cos - k_hi * sin).to(out_ty), mask=mask_kv)
    tl.store(k_pool_ptr + pool_off + HALF, (k_hi * cos + k_lo * sin).to(out_ty), mask=mask_kv)
    v_lo_ptrs = v_ptr + token * stride_vt + offs_kh[:, None] * stride_vh + offs_d[None, :]
    v_lo = tl.load(v_lo_ptrs, mask=mask_kv, other=0.0)
    v_hi = tl.load(v_lo_ptrs + HALF, mask=mask_kv, other=0.0)
    tl.store(v_pool_ptr + pool_off, v_lo.to(v_pool_ptr.dtype.element_ty), mask=mask_kv)
    tl.store(v_pool_ptr + pool_off + HALF, v_hi.to(v_pool_ptr.dtype.element_ty), mask=mask_kv)


def rope_cos_sin_cache(
    inv_freq: torch.Tensor,  # [D/2] fp32
    max_positions: int,
    scale: float = 1.0,  # rope attention scaling (ModelConfig.rope_inv_freq's second value)
) -> torch.Tensor:  # [max_positions, D] fp32: [cos | sin]
    freqs = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)[:, None]
    freqs = freqs * inv_freq.float()[None, :]
    return torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1).contiguous()


def rope_and_write_kv(
    q: torch.Tensor,  # [T, H, D]; rotated in place
    k: torch.Tensor,  # [T, Hkv, D]; left untouched
    v: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int
    cos_sin_cache: torch.Tensor,  # [max_positions, D] fp32
    k_pool: torch.Tensor,  # [num_slots, Hkv, D]
    v_pool: torch.Tensor,  # [num_slots, Hkv, D]
    write_slots: torch.Tensor,  # [T] int, slot = page * page_size + offset
) -> torch.Tensor:  # q, rotated
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and cos_sin_cache.shape[1] == head_dim
    assert k.shape == v.shape == (tokens, num_kv_heads, head_dim)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "head dim must be contiguous"
    assert k_pool.shape[1:] == (num_kv_heads, head_dim) and k_pool.stride() == v_pool.stride()
    assert k_pool.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    if tokens == 0:
        return q
    half = head_dim // 2
    use_pdl = pdl.enabled(q)
    _rope_kv_kernel[(tokens,)](
        q,
        k,
        v,
        positions,
        cos_sin_cache,
        k_pool,
        v_pool,
        write_slots,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0),
        k_pool.stride(0),
        k_pool.stride(1),
        num_heads,
        num_kv_heads,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        USE_PDL=use_pdl,
        num_warps=4,
        **pdl.launch_options(use_pdl),
    )
    return q


def rope_and_write_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    write_slots: torch.Tensor,
) -> torch.Tensor:
    """Out of place for q (returns it); writes the pool like the kernel."""
    half = q.shape[-1] // 2
    cos, sin = cos_sin_cache[positions].float().split(half, dim=-1)  # [T, D/2] each
    cos = torch.cat([cos, cos], dim=-1)[:, None, :]  # [T, 1, D]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)

    def raw(t: torch.Tensor) -> torch.Tensor:  # fp8 pools: no fp8 index_copy_ everywhere
        return t.view(torch.uint8) if t.element_size() == 1 else t

    raw(k_pool).index_copy_(0, write_slots, raw(rotate(k).to(k_pool.dtype)))
    raw(v_pool).index_copy_(0, write_slots, raw(v.to(v_pool.dtype)))
    return rotate(q)
