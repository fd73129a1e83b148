"""A decode step's attention on the CPU in one C call per layer (`cpu_attention.c`): rope on q
and k, the new K/V into the paged pool, softmax attention over each request's keys read from the
pool by slot. Built into the same library as `cpu_blocks.c` (see `cpu_blocks.library`)."""

from __future__ import annotations

import ctypes

import torch

HEAD_DIMS = (16, 32, 64, 128, 256)  # whole AVX-512 vectors, a power of two of them
MAX_HEADS = 128


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """The shapes `cpu_attention.c` takes (it refuses others with -1)."""
    return num_heads % num_kv_heads == 0 and num_heads <= MAX_HEADS and head_dim in HEAD_DIMS


def decode_attention(
    lib: ctypes.CDLL,
    qkv: torch.Tensor,  # [B, (H + 2 Hkv) * D] fp32: q and k are roped in place
    cos: torch.Tensor | None,  # [B, D] (sin's first half negated), None: q, k roped already
    sin: torch.Tensor | None,
    k_pool: torch.Tensor,  # [slots, Hkv, D] fp32, this layer's
    v_pool: torch.Tensor,
    kv_slots: torch.Tensor,  # [B, >= max(kv_lens)] int64: slot of each position
    kv_lens: torch.Tensor,  # [B] int64: KV length after the step (new token at kv_len - 1)
    num_heads: int,
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    """Writes the step's K and V at slot kv_slots[b, kv_len - 1] and attends over positions
    [0, kv_len) of each request b."""
    bsz = qkv.shape[0]
    _, kv_heads, dim = k_pool.shape
    tensors = [qkv, k_pool, v_pool] + ([cos, sin] if cos is not None else [])
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):  # type: ignore[union-attr]
        raise ValueError("CPU decode attention takes fp32 CPU tensors")
    if not all(t.is_contiguous() for t in (*tensors, kv_slots, kv_lens)):  # type: ignore[union-attr]
        raise ValueError("CPU decode attention takes contiguous tensors")
    if kv_slots.dtype != torch.int64 or kv_lens.dtype != torch.int64:
        raise ValueError("kv_slots and kv_lens must be int64")
    if qkv.shape != (bsz, (num_heads + 2 * kv_heads) * dim) or v_pool.shape != k_pool.shape:
        raise ValueError(
            f"q|k|v {tuple(qkv.shape)} does not fit {num_heads} heads over a pool of "
            f"{kv_heads} KV heads of {dim}"
        )
    if kv_slots.shape[0] != bsz or kv_lens.shape != (bsz,):
        raise ValueError("one row of slots and one length per request")
    if cos is not None and (cos.shape != (bsz, dim) or sin is None or sin.shape != (bsz, dim)):
        raise ValueError(f"cos and sin must be [{bsz}, {dim}]")
    if not supports(num_heads, kv_heads, dim):
        raise ValueError(
            f"CPU decode attention takes head dims {HEAD_DIMS} and at most {MAX_HEADS} heads "
            f"(a whole number per KV head), not {num_heads} heads / {kv_heads} KV heads of {dim}"
        )
    out = torch.empty(bsz, num_heads, dim)
    rc = lib.decode_attention(
        qkv.data_ptr(),
        None if cos is None else cos.data_ptr(),
        None if sin is None else sin.data_ptr(),
        k_pool.data_ptr(),
        v_pool.data_ptr(),
        kv_slots.data_ptr(),
        kv_slots.shape[1],
        kv_lens.data_ptr(),
        bsz,
        num_heads,
        kv_heads,
        dim,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(
            f"CPU decode attention refused its lengths (each must be 1..{kv_slots.shape[1]})"
        )
    return out
