"""The attention-backend interface and the per-step inputs every backend plans from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..kv_cache import KVPool


@dataclass(frozen=True)
class AttentionInputs:
    """What one step attends over, built once per step by the runner (host tensors).

    Request i contributes `extend_lens[i]` new tokens whose positions start at `prefix_lens[i]`;
    after this step it holds `prefix_lens[i] + extend_lens[i]` tokens of KV, stored at the slots
    `kv_slots[i, :kv_len]` (slot = page * page_size + offset; padding points at the dummy slot 0).
    """

    prefix_lens: torch.Tensor  # [B] int64
    extend_lens: torch.Tensor  # [B] int64
    kv_slots: torch.Tensor  # [B, max_kv_len] int64
    write_slots: torch.Tensor  # [T] int64, where each new token's K/V goes
    is_decode: bool  # every extend_len == 1

    @property
    def batch_size(self) -> int:
        return int(self.extend_lens.shape[0])

    @property
    def kv_lens(self) -> torch.Tensor:
        return self.prefix_lens + self.extend_lens


class AttentionBackend(ABC):
    """Contract: `plan(inputs)` is called once per step before the forward pass and may allocate;
    `forward` is called once per layer, must write the new tokens' K/V into `pool` at
    `inputs.write_slots` before attending, and must return causal attention of each new token
    over its request's prefix plus the new tokens up to itself. It never reads another request's KV.
    """

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

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
    ) -> torch.Tensor:  # [T, H, D]
        ...
