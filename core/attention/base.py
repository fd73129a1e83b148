"""The attention-backend interface and the per-step inputs every backend plans from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..kv_cache import KVPool

if TYPE_CHECKING:
    from ..cuda_graph import DecodeGraphBuffers, DecodeInputs


@dataclass(frozen=True)
class AttentionInputs:
    """What one step attends over, built once per step by the runner.

    Request i contributes `extend_lens[i]` new tokens whose positions start at `prefix_lens[i]`;
    after this step it holds `prefix_lens[i] + extend_lens[i]` tokens of KV, stored at the slots
    `kv_slots[i, :kv_len]` (slot = page * page_size + offset; padding points at the dummy slot 0).
    The lengths are host tensors (backends plan from them without a device sync); `kv_slots` and
    `write_slots` may live on the host or already on the pool's device (the runner's are).
    """

    prefix_lens: torch.Tensor  # [B] int64, host
    extend_lens: torch.Tensor  # [B] int64, host
    kv_slots: torch.Tensor  # [B, max_kv_len] int64
    write_slots: torch.Tensor  # [T] int64, where each new token's K/V goes
    is_decode: bool  # every extend_len == 1
    # The slot-table row of each request, when each is a running request on its own row (the
    # runner's scheduled steps); None for draft and verify passes. Backends that keep state per
    # request (the torch backend's decode mirror) key it by these.
    rows: tuple[int, ...] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.extend_lens.shape[0])

    @property
    def kv_lens(self) -> torch.Tensor:
        return self.prefix_lens + self.extend_lens


class AttentionBackend(ABC):
    """Contract: `plan(inputs)` is called once per step before the forward pass and may allocate;
    it sets `write_slots` ([T] on the pool's device). `forward` is called once per layer, must
    write the new tokens' K/V into `pool` at `write_slots` before attending (unless the caller
    did, `kv_written=True`: the fused rope + KV-write kernel), and must return causal attention of
    each new token over its request's prefix plus the new tokens up to itself. It never reads
    another request's KV.

    CUDA graphs (decode only): a backend with `supports_cuda_graph` gets `init_cuda_graph` once,
    then `prepare_for_capture(bs, buffers)` before a bucket's graph is captured, after which
    `forward` must launch only work whose shapes depend on `bs` alone and read every per-step
    value from `buffers`; `prepare_for_replay(bs, buffers, host)` runs before each replay, once
    the runner has filled the buffers (`host`: the same columns on the host, for backends that
    plan there, such as FlashInfer, without a device sync). The default backend is not
    graph-safe: its decode runs eager.
    """

    supports_cuda_graph: bool = False

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.write_slots = torch.empty(0, dtype=torch.int64, device=pool.device)

    @abstractmethod
    def plan(self, inputs: AttentionInputs) -> None: ...

    @abstractmethod
    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        scale: float,
        kv_written: bool = False,
    ) -> torch.Tensor:  # [T, H, D]
        ...

    def decode_from_qkv(
        self,
        layer_id: int,
        qkv: torch.Tensor,  # [B, (H + 2 Hkv) * D] the merged projection, contiguous
        cos: torch.Tensor,  # [B, D] (sin's first half negated: RotaryEmbedding.cos_sin)
        sin: torch.Tensor,
        num_heads: int,
        scale: float,
    ) -> torch.Tensor | None:  # [B, H, D]
        """Optional fast path for a decode step of a model without q/k norm: rope, the KV
        write and attention in one call. None when the backend has none (or not for these
        shapes); the caller then ropes and calls `forward` as usual."""
        return None

    def release(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing extra
        """Give back memory the backend holds beyond the pool (shutdown or rebuild)."""

    # ---- CUDA-graph hooks --------------------------------------------------------------------

    def init_cuda_graph(self, buffers: DecodeGraphBuffers, num_heads: int, head_dim: int) -> None:
        """Allocate what every bucket up to `buffers.max_bs` shares (workspaces), once."""
        raise NotImplementedError(f"{type(self).__name__} is not CUDA-graph safe")

    def prepare_for_capture(self, bs: int, buffers: DecodeGraphBuffers) -> None:
        raise NotImplementedError(f"{type(self).__name__} is not CUDA-graph safe")

    def prepare_for_replay(
        self, bs: int, buffers: DecodeGraphBuffers, host: DecodeInputs | None = None
    ) -> None:
        raise NotImplementedError(f"{type(self).__name__} is not CUDA-graph safe")
