"""Attention from our Triton kernels (llmconsole.kernels): split-KV decode and ragged extend.

`plan` packs the step's index tensors into one host buffer and moves it to the GPU in a single
copy; every layer then writes its K/V into the pool and launches one attention kernel (two for
split-KV decode) that reads K/V straight from the pool through `kv_slots`, with no gather.
"""

from __future__ import annotations

import torch
import triton

from ...kernels.decode_attention import decode_attention, decode_num_splits, decode_workspace
from ...kernels.extend_attention import extend_attention
from ..kv_cache import KVPool
from .base import AttentionBackend, AttentionInputs


class TritonAttention(AttentionBackend):
    """Runs on CUDA; on CPU only under Triton's interpreter (TRITON_INTERPRET=1, for tests)."""

    def __init__(self, pool: KVPool) -> None:
        if pool.device.type == "cuda":
            props = torch.cuda.get_device_properties(pool.device)
            self._num_sms = props.multi_processor_count
        elif triton.knobs.runtime.interpret:
            self._num_sms = 4
        else:
            raise ValueError(
                f"--attention-backend triton needs a CUDA device, not {pool.device.type}; "
                "use --attention-backend torch"
            )
        super().__init__(pool)

    def plan(self, inputs: AttentionInputs) -> None:
        bsz = inputs.batch_size
        max_kv = int(inputs.kv_slots.shape[1])
        num_tokens = int(inputs.write_slots.shape[0])
        extend = inputs.extend_lens
        q_starts = torch.cumsum(extend, 0) - extend
        # [kv_slots | write_slots | kv_lens | prefix_lens | extend_lens | q_starts]: one copy.
        packed = torch.cat(
            [
                inputs.kv_slots.reshape(-1),
                inputs.write_slots,
                inputs.kv_lens,
                inputs.prefix_lens,
                extend,
                q_starts,
            ]
        ).to(self.pool.device, non_blocking=True)
        kv_slots, write_slots, rest = packed.split([bsz * max_kv, num_tokens, 4 * bsz])
        self._kv_slots = kv_slots.view(bsz, max_kv)  # [B, max_kv]
        self._write_slots = write_slots  # [T]
        self._kv_lens, self._prefix_lens, self._extend_lens, self._q_starts = rest.split(bsz)
        self._is_decode = inputs.is_decode
        self._max_extend = int(extend.max()) if bsz else 0
        self._num_splits = decode_num_splits(
            bsz, self.pool.spec.num_kv_heads, max_kv, self._num_sms
        )
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None  # made by layer 0

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        self.pool.write(layer_id, self._write_slots, k, v)
        k_pool, v_pool = self.pool.k[layer_id], self.pool.v[layer_id]
        if self._is_decode:  # one token per request: q rows are requests
            if self._workspace is None:
                bsz, heads, head_dim = q.shape
                self._workspace = decode_workspace(bsz, heads, self._num_splits, head_dim, q.device)
            return decode_attention(
                q,
                k_pool,
                v_pool,
                self._kv_slots,
                self._kv_lens,
                scale,
                self._num_splits,
                workspace=self._workspace,
            )
        return extend_attention(
            q,
            k_pool,
            v_pool,
            self._kv_slots,
            self._prefix_lens,
            self._extend_lens,
            scale,
            max_extend=self._max_extend,
            q_starts=self._q_starts,
        )
