"""Attention from our Triton kernels (llmconsole.kernels): split-KV decode and ragged extend.

`plan` moves the step's lengths to the GPU in one queued copy (the runner hands over `kv_slots`
and `write_slots` already there); every layer then writes its K/V into the pool (unless the
model's fused rope kernel did) and launches one attention kernel (two for split-KV decode) that
reads K/V straight from the pool through `kv_slots`, with no gather.

CUDA graphs: captured decode reads the runner's slot table in place through per-request rows,
with a fixed number of KV splits per bucket and one preallocated workspace, so a replay serves
any KV lengths up to the table's width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton

from ...kernels.decode_attention import (
    decode_attention,
    decode_num_splits,
    decode_workspace,
    stage1_resident,
)
from ...kernels.extend_attention import extend_attention
from ..kv_cache import KVPool
from ..transfer import to_device
from .base import AttentionBackend, AttentionInputs

if TYPE_CHECKING:
    from ..cuda_graph import DecodeGraphBuffers, DecodeInputs


class TritonAttention(AttentionBackend):
    """Runs on CUDA; on CPU only under Triton's interpreter (TRITON_INTERPRET=1, for tests)."""

    supports_cuda_graph = True

    def __init__(self, pool: KVPool) -> None:
        if pool.device.type == "cuda":
            props = torch.cuda.get_device_properties(pool.device)
            self._num_sms = props.multi_processor_count
            # getattr: older torch builds lack some of these (the defaults are an H100's).
            self._resident = stage1_resident(
                getattr(props, "regs_per_multiprocessor", 65536),
                getattr(props, "shared_memory_per_multiprocessor", 233472),
                getattr(props, "max_threads_per_multi_processor", 2048),
            )
        elif triton.knobs.runtime.interpret:
            self._num_sms, self._resident = 4, 5
        else:
            raise ValueError(
                f"--attention-backend triton needs a CUDA device, not {pool.device.type}; "
                "use --attention-backend torch"
            )
        super().__init__(pool)
        self._graph_workspace: torch.Tensor | None = None  # flat fp32, shared by all buckets

    def plan(self, inputs: AttentionInputs) -> None:
        device = self.pool.device
        bsz = inputs.batch_size
        extend = inputs.extend_lens
        q_starts = torch.cumsum(extend, 0) - extend
        # [kv_lens | prefix_lens | extend_lens | q_starts]: one queued copy.
        packed = torch.cat([inputs.kv_lens, inputs.prefix_lens, extend, q_starts])
        lens = to_device(packed, device)
        self._kv_lens, self._prefix_lens, self._extend_lens, self._q_starts = lens.split(bsz)
        self._kv_slots = to_device(inputs.kv_slots, device)  # [B, max_kv]
        self._kv_rows: torch.Tensor | None = None
        self.write_slots = to_device(inputs.write_slots, device)  # [T]
        self._is_decode = inputs.is_decode
        self._max_extend = int(extend.max()) if bsz else 0
        self._num_splits = decode_num_splits(
            bsz,
            self.pool.spec.num_kv_heads,
            int(inputs.kv_slots.shape[1]),
            self._num_sms,
            self._resident,
        )
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None  # made by layer 0

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        scale: float,
        kv_written: bool = False,
    ) -> torch.Tensor:  # [T, H, D]
        if not kv_written:
            self.pool.write(layer_id, self.write_slots, k, v)
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
                kv_rows=self._kv_rows,
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

    # ---- CUDA-graph hooks --------------------------------------------------------------------

    def _graph_splits(self, bs: int, max_kv: int) -> int:
        # Chosen for the longest KV a request can have; each request then cuts its own length
        # into this many slices on the device, so short requests still spread over the SMs.
        heads = self.pool.spec.num_kv_heads
        return decode_num_splits(bs, heads, max_kv, self._num_sms, self._resident)

    def init_cuda_graph(self, buffers: DecodeGraphBuffers, num_heads: int, head_dim: int) -> None:
        # Replays run one at a time on one stream, so one workspace sized for the largest
        # bs x splits serves every bucket.
        width = buffers.slot_table.shape[1]
        most = max(bs * self._graph_splits(bs, width) for bs in range(1, buffers.max_bs + 1))
        self._graph_workspace = torch.empty(
            most * num_heads * (head_dim + 1), dtype=torch.float32, device=self.pool.device
        )
        self._graph_shape = (num_heads, head_dim)

    def prepare_for_capture(self, bs: int, buffers: DecodeGraphBuffers) -> None:
        assert self._graph_workspace is not None, "init_cuda_graph first"
        heads, head_dim = self._graph_shape
        width = int(buffers.slot_table.shape[1])
        inputs = buffers.columns(bs)
        self._is_decode = True
        self._kv_slots = buffers.slot_table  # [R, W], read in place through _kv_rows
        self._kv_rows = inputs.rows
        self._kv_lens = inputs.kv_lens
        self.write_slots = inputs.write_slots
        self._num_splits = self._graph_splits(bs, width)
        self._workspace = _workspace_views(
            self._graph_workspace, bs, heads, self._num_splits, head_dim
        )

    def prepare_for_replay(
        self, bs: int, buffers: DecodeGraphBuffers, host: DecodeInputs | None = None
    ) -> None:
        """Nothing to do: the captured kernels read lengths, rows and slots from `buffers`."""


def _workspace_views(
    flat: torch.Tensor, bs: int, heads: int, splits: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mid_o [bs, H, S, D], mid_lse [bs, H, S]) carved from the front of one fp32 buffer."""
    n = bs * heads * splits
    mid_o = flat[: n * head_dim].view(bs, heads, splits, head_dim)
    return mid_o, flat[n * head_dim : n * (head_dim + 1)].view(bs, heads, splits)
