"""Reference attention: torch SDPA over KV gathered from the paged pool (CPU and GPU).

The ragged batch is padded to [B, max_extend] queries and [B, max_kv] keys once per step (in
`plan`); every layer then does one gather and one SDPA call, never a Python loop over requests.
On CPU with an fp32 pool, a decode step of a model without q/k norm runs one C call per layer
(`kernels/cpu_attention.c`: rope, KV write, attention over the pool by slot) when the kernel
library builds. Otherwise batched decode reads a per-request contiguous mirror of the KV
instead of gathering (see kv_mirror), and a lone request whose slots are one run reads a view
of the pool.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmconsole.kernels import cpu_attention

from ..kv_cache import KVPool
from ..transfer import to_device
from .base import AttentionBackend, AttentionInputs
from .kv_mirror import DecodeKVMirror, MirrorPlan

_MIRROR_ENV = "LLMCONSOLE_CPU_KV_MIRROR"  # "0": gather from the pool (A/B runs)
_C_DECODE_ENV = "LLMCONSOLE_CPU_DECODE_ATTENTION"  # "0": torch ops for decode (A/B runs)

# cuDNN's SDPA builds (and caches) an execution plan per sequence length: every decode step has a
# new KV length, so on CUDA it re-plans every step (~40 ms each on an H100). The other kernels
# take any length.
_CUDA_SDPA_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


class TorchAttention(AttentionBackend):
    def __init__(self, pool: KVPool, decode_mirror: bool | None = None) -> None:
        """`decode_mirror`: read batched decode from a contiguous KV mirror (kv_mirror; CPU
        pools only). None picks it for CPU pools not in fp8, unless LLMCONSOLE_CPU_KV_MIRROR=0."""
        super().__init__(pool)
        self._kernels = (
            (lambda: sdpa_kernel(_CUDA_SDPA_BACKENDS))
            if pool.device.type == "cuda"
            else contextlib.nullcontext
        )
        # The mirror holds at most as many tokens as the pool (so at most twice the KV memory).
        # Not for fp8 pools: the mirror would keep what the pool rounds.
        if decode_mirror is None:
            decode_mirror = (
                pool.device.type == "cpu"
                and pool.spec.dtype.itemsize > 1
                and os.environ.get(_MIRROR_ENV, "1") != "0"
            )
        if decode_mirror and pool.device.type != "cpu":
            raise ValueError("the decode KV mirror is for CPU pools")
        self._mirror = DecodeKVMirror(pool, pool.spec.num_slots) if decode_mirror else None
        self._mirror_plan: MirrorPlan | None = None
        self._c_lib = _c_decode_library(pool)
        self._c_decode: tuple[torch.Tensor, torch.Tensor] | None = None  # kv_slots, kv_lens
        self._deferred: AttentionInputs | None = None  # planned for `forward` on first use

    def plan(self, inputs: AttentionInputs) -> None:
        self._c_decode = self._deferred = None
        if inputs.is_decode and self._c_lib is not None:
            # The C path needs nothing more; `forward` (a model with q/k norm) plans the rest.
            self.write_slots = inputs.write_slots
            self._c_decode = (inputs.kv_slots.contiguous(), inputs.kv_lens)
            self._deferred = inputs
            return
        self._plan(inputs)

    def decode_from_qkv(
        self,
        layer_id: int,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        num_heads: int,
        scale: float,
    ) -> torch.Tensor | None:
        spec = self.pool.spec
        if self._c_decode is None or not cpu_attention.supports(
            num_heads, spec.num_kv_heads, spec.head_dim
        ):
            return None
        kv_slots, kv_lens = self._c_decode
        pool = self.pool
        return cpu_attention.decode_attention(
            self._c_lib,  # type: ignore[arg-type]
            qkv,
            cos,
            sin,
            pool.k[layer_id],
            pool.v[layer_id],
            kv_slots,
            kv_lens,
            num_heads,
            scale,
        )

    def _plan(self, inputs: AttentionInputs) -> None:
        device = self.pool.device
        extend = inputs.extend_lens
        prefix = inputs.prefix_lens
        bsz = inputs.batch_size
        max_extend = int(extend.max())
        kv_lens = inputs.kv_lens
        max_kv = int(inputs.kv_slots.shape[1])
        num_tokens = int(extend.sum())
        self.write_slots = to_device(inputs.write_slots, device)
        # A lone request whose slots are one contiguous run (the allocator hands out ascending
        # pages) reads its KV as a view of the pool: no gather at all. Checked only where the
        # slots are on the host: reading device slots back would stall the step.
        # The view is [1, Hkv, max_kv, D] as (size, stride, offset): one as_strided per layer
        # and tensor instead of a slice, a view and a transpose.
        self._kv_run: tuple[tuple[int, ...], tuple[int, ...], int] | None = None
        if bsz == 1 and inputs.kv_slots.device.type == "cpu":
            first = int(inputs.kv_slots[0, 0])
            if torch.equal(inputs.kv_slots[0], torch.arange(first, first + max_kv)):
                _, heads, dim = self.pool.k[0].shape  # each layer's own dense buffer
                tok = heads * dim
                self._kv_run = ((1, heads, max_kv, dim), (max_kv * tok, dim, tok, 1), first * tok)
        self._mirror_plan = self._plan_mirror(inputs)
        if self._mirror_plan is not None:
            return  # nothing to gather, no mask of the padded batch: the mirror has its own
        # One flat index: index_select is several times faster than 2-D advanced indexing.
        self._kv_flat = to_device(inputs.kv_slots.reshape(-1), device)
        key_pos = torch.arange(max_kv)
        self._is_causal = False
        mask: torch.Tensor | None
        if inputs.is_decode:
            self._q_index = None
            self._out_index = None
            # mask: [B, 1, 1, max_kv]; none needed when every request has max_kv keys
            mask = None
            if bool((kv_lens != max_kv).any()):
                mask = (key_pos[None, :] < kv_lens[:, None])[:, None, None, :]
        elif bsz == 1 and int(prefix[0]) == 0:
            # One fresh prompt: plain causal attention, no padding, no mask to build.
            self._q_index = None
            self._out_index = None
            self._is_causal = True
            mask = None
        else:
            q_off = torch.arange(max_extend)
            valid_q = q_off[None, :] < extend[:, None]  # [B, Qmax]
            starts = torch.cumsum(extend, 0) - extend
            q_index = torch.where(valid_q, starts[:, None] + q_off[None, :], num_tokens)
            q_pos = prefix[:, None] + q_off[None, :]  # [B, Qmax]
            mask = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, Qmax, Kmax], causal
            mask &= key_pos[None, None, :] < kv_lens[:, None, None]
            mask[:, :, 0] |= ~valid_q  # padded queries attend to slot 0 only, never NaN
            mask = mask[:, None]
            self._q_index = to_device(q_index, device)
            self._out_index = to_device(
                (torch.arange(bsz)[:, None] * max_extend + q_off[None, :])[valid_q], device
            )
        self._mask = None if mask is None else to_device(mask, device)
        self._shape = (bsz, max_extend, max_kv)

    @property
    def mirror(self) -> DecodeKVMirror | None:
        """The decode mirror, when this backend keeps one."""
        return self._mirror

    def _plan_mirror(self, inputs: AttentionInputs) -> MirrorPlan | None:
        """Batched decode on the mirror; any other step tells it which requests' KV it changed."""
        mirror = self._mirror
        if mirror is None:
            return None
        if inputs.rows is None:  # a draft or verify pass: which requests it touched is unknown
            mirror.invalidate()
            return None
        if not inputs.is_decode:
            mirror.invalidate(inputs.rows)
            return None
        if self._kv_run is not None:  # one request on one run of slots: a view already
            return None
        return mirror.plan_decode(inputs.rows, inputs.kv_lens.tolist(), inputs.kv_slots)

    def release(self) -> None:
        self._mirror_plan = None
        self._c_decode = self._deferred = None
        if self._mirror is not None:
            self._mirror.release()

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        scale: float,
        kv_written: bool = False,
    ) -> torch.Tensor:
        if self._deferred is not None:  # a decode step planned for the C path: plan it here
            inputs, self._deferred = self._deferred, None
            self._c_decode = None
            self._plan(inputs)
        if not kv_written:
            self.pool.write(layer_id, self.write_slots, k, v)
        if self._mirror_plan is not None:
            return self._decode_on_mirror(layer_id, q, k, v, scale)
        bsz, max_extend, max_kv = self._shape
        heads, head_dim = q.shape[1], q.shape[2]
        if self._kv_run is not None:  # [1, Hkv, Kmax, D] views of the pool, no copy
            size, stride, offset = self._kv_run
            keys = self.pool.k[layer_id].as_strided(size, stride, offset)
            values = self.pool.v[layer_id].as_strided(size, stride, offset)
        else:
            kv_shape = (bsz, max_kv, k.shape[1], head_dim)
            keys = self.pool.k[layer_id].index_select(0, self._kv_flat).view(kv_shape)
            values = self.pool.v[layer_id].index_select(0, self._kv_flat).view(kv_shape)
            keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, Kmax, D]
        if keys.dtype != q.dtype:  # an fp8 pool (--kv-cache-dtype): widen what was read
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        num_kv_heads = keys.shape[1]
        grouped = self._q_index is None and not self._is_causal and num_kv_heads != heads
        if self._is_causal:
            queries = q[None].transpose(1, 2)  # [1, H, T, D]
        elif grouped:
            # Decode with GQA: the G query heads of a KV head act as G query rows over it, so
            # SDPA never repeats K/V per query head (~25% off its time at batch 32 on CPU).
            queries = q.view(bsz, num_kv_heads, heads // num_kv_heads, head_dim)
        elif self._q_index is None:
            queries = q.unsqueeze(2)  # [B, H, 1, D]
        else:
            padded = torch.cat([q, q.new_zeros(1, heads, head_dim)])
            queries = padded[self._q_index].transpose(1, 2)  # [B, H, Qmax, D]
        with self._kernels():
            out = F.scaled_dot_product_attention(
                queries,
                keys,
                values,
                attn_mask=self._mask,
                is_causal=self._is_causal,
                scale=scale,
                enable_gqa=num_kv_heads != heads and not grouped,
            )  # [B, H, Qmax, D] ([B, Hkv, G, D] grouped)
        if max_extend == 1:  # decode: [B, H, 1, D] and [B, Hkv, G, D] are [B, H, D] already
            return out.reshape(bsz, heads, head_dim)
        out = out.transpose(1, 2).reshape(bsz * max_extend, heads, head_dim)
        return out if self._out_index is None else out[self._out_index]

    def _decode_on_mirror(
        self,
        layer_id: int,
        q: torch.Tensor,  # [B, H, D]
        k: torch.Tensor,  # [B, Hkv, D]
        v: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:  # [B, H, D]
        plan = self._mirror_plan
        assert plan is not None and self._mirror is not None
        keys, values = self._mirror.write_and_view(layer_id, plan, k, v)  # [span, Hkv, K, D]
        bsz, heads, head_dim = q.shape
        kv_heads = k.shape[1]
        queries = q.view(bsz, kv_heads, heads // kv_heads, head_dim)  # GQA as query rows
        if not plan.in_order:  # the batch's requests sit in other mirror rows
            spread = queries.new_zeros(plan.span, *queries.shape[1:])
            queries = spread.index_copy_(0, plan.rows, queries)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=plan.mask, scale=scale
        )  # [span, Hkv, G, D]
        if not plan.in_order:
            out = out.index_select(0, plan.rows)
        return out.reshape(bsz, heads, head_dim)


def _c_decode_library(pool: KVPool) -> object | None:
    """The C kernels' library when this pool's decode steps can use them: an fp32 CPU pool, the
    switch not off, and the library built (or buildable: the first start builds it)."""
    if pool.device.type != "cpu" or pool.spec.dtype != torch.float32:
        return None
    if os.environ.get(_C_DECODE_ENV, "1") == "0":
        return None
    from ..cpu_kernels import library

    return library()
