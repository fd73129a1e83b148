"""Decode CUDA graphs: the one owner of captured graphs, their static inputs and their memory.

A decode step of batch size B replays the graph of the smallest captured bucket >= B; the rows
B..bucket are padding, a dummy request that reads and writes only the dummy page (slot-table row
0 maps every position to slot 0). Batches above the largest bucket run eager. Buckets follow
SGLang: 1, 2, 4, 8, then every multiple of 8 up to --cuda-graph-max-bs. All graphs share one
memory pool (captured largest first, so the smaller ones fit in the larger one's memory) and
write their logits into one static buffer.

Per step, outside the graph: one queued host->device copy of the padded inputs, one scatter into
the slot table, the replay; sampling reads the logits afterwards (one host sync in all).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .attention.base import AttentionBackend
from .models.llama import LlamaForCausalLM
from .slot_table import DUMMY_ROW, SlotTable

DUMMY_SLOT = 0  # first slot of the dummy page (KVPool never hands page 0 out)
# Padded rows: token 0 at position 0, written to the dummy slot, its "KV" that one slot.
NUM_INPUTS = 5  # input_ids, positions, write_slots, rows, kv_lens
_PAD_COLUMN = (0, 0, DUMMY_SLOT, DUMMY_ROW, 1)


def capture_batch_sizes(max_bs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, 24, ... up to `max_bs`, which is always a bucket itself."""
    if max_bs < 1:
        raise ValueError(f"cuda-graph-max-bs must be >= 1, got {max_bs}")
    sizes = [bs for bs in (1, 2, 4, 8) if bs <= max_bs] + list(range(16, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return tuple(sizes)


def padded_batch_size(batch_size: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds `batch_size` rows; None above the largest (runs eager)."""
    i = bisect.bisect_left(buckets, batch_size)
    return buckets[i] if i < len(buckets) else None


def pad_decode_inputs(
    input_ids: Sequence[int],
    positions: Sequence[int],
    write_slots: Sequence[int],
    rows: Sequence[int],
    padded_bs: int,
) -> torch.Tensor:  # [NUM_INPUTS * padded_bs] int64, host: the static buffer's layout
    """One decode step's inputs, padded with dummy requests to `padded_bs` rows."""
    bs = len(input_ids)
    if not (len(positions) == len(write_slots) == len(rows) == bs <= padded_bs):
        raise ValueError(f"{bs} decode rows do not fit a bucket of {padded_bs}")
    pad = padded_bs - bs
    kv_lens = [p + 1 for p in positions]  # a decode token attends to itself and all before it
    columns = (input_ids, positions, write_slots, rows, kv_lens)
    flat: list[int] = []
    for values, filler in zip(columns, _PAD_COLUMN, strict=True):
        flat.extend(values)
        flat.extend([filler] * pad)
    return torch.tensor(flat, dtype=torch.int64)


@dataclass(frozen=True)
class DecodeInputs:
    """One bucket's input columns, each [bs] int64: views of the static buffer on the device
    (or of the step's host copy, handed to `prepare_for_replay`)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    write_slots: torch.Tensor
    rows: torch.Tensor  # slot-table row per request
    kv_lens: torch.Tensor


@dataclass(frozen=True)
class DecodeGraphBuffers:
    """Every static tensor the captured graphs read or write.

    `packed` holds a bucket's five input columns back to back in its first 5 * bs entries, so a
    step's inputs arrive in one contiguous copy whatever the bucket; `logits` [max_bs, V] is
    the graphs' shared output (model dtype; the sampler upcasts).
    """

    packed: torch.Tensor  # [NUM_INPUTS * max_bs] int64
    slot_table: torch.Tensor  # [R, W] int64, the runner's slot table (read in place)
    logits: torch.Tensor  # [max_bs, V]
    features: torch.Tensor | None = None  # [max_bs, F]: the target's features for EAGLE

    @property
    def max_bs(self) -> int:
        return int(self.logits.shape[0])

    def columns(self, bs: int) -> DecodeInputs:
        return DecodeInputs(*self.packed[: NUM_INPUTS * bs].view(NUM_INPUTS, bs).unbind(0))


@dataclass(frozen=True)
class CaptureReport:
    batch_sizes: tuple[int, ...]
    seconds: float
    memory_bytes: int  # what the graphs' shared pool took on the device


class DecodeGraphRunner:
    """Captures and replays decode graphs for one model, backend and slot table."""

    def __init__(
        self,
        model: LlamaForCausalLM | Any,
        attention: AttentionBackend,
        slots: SlotTable,
        max_bs: int,
    ) -> None:
        if not attention.supports_cuda_graph:
            raise ValueError(f"{type(attention).__name__} is not CUDA-graph safe")
        self.model = model
        self.attention = attention
        self.slots = slots
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.buffers = self._make_buffers(max_bs)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _make_buffers(self, max_bs: int) -> DecodeGraphBuffers:
        model, device = self.model, self.slots.table.device
        dtype = model.lm_head_weight.dtype
        return DecodeGraphBuffers(
            packed=torch.zeros(NUM_INPUTS * max_bs, dtype=torch.int64, device=device),
            slot_table=self.slots.table,
            logits=torch.zeros(max_bs, model.config.vocab_size, dtype=dtype, device=device),
            features=torch.zeros(max_bs, model.feature_size, dtype=dtype, device=device)
            if model.feature_layers
            else None,
        )

    @property
    def max_bs(self) -> int:
        return self.batch_sizes[-1]

    def padded_size(self, batch_size: int) -> int | None:
        return padded_batch_size(batch_size, self.batch_sizes)

    def _forward(self, bs: int) -> None:
        inputs = self.buffers.columns(bs)
        features = self.buffers.features
        self.model(
            inputs.input_ids,
            inputs.positions,
            self.attention,
            out=self.buffers.logits[:bs],
            features=None if features is None else features[:bs],
        )

    @torch.inference_mode()
    def capture(self, progress: Callable[[float], None] | None = None) -> CaptureReport:
        started = time.perf_counter()
        config = self.model.config
        self.attention.init_cuda_graph(self.buffers, config.num_heads, config.head_dim)
        # Every column padding: capture-time kernels read and write only the dummy page.
        self.buffers.packed.copy_(pad_decode_inputs([], [], [], [], self.max_bs))
        device = self.buffers.packed.device
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_reserved(device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        for done, bs in enumerate(reversed(self.batch_sizes)):
            self.attention.prepare_for_capture(bs, self.buffers)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm up: Triton JIT, cuBLAS heuristics
                self._forward(bs)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA calls (the console) must not void the capture
            with torch.cuda.graph(graph, pool, stream, capture_error_mode="thread_local"):
                self._forward(bs)
            self._graphs[bs] = graph
            if progress is not None:
                progress((done + 1) / len(self.batch_sizes))
        torch.cuda.synchronize(device)
        return CaptureReport(
            self.batch_sizes,
            time.perf_counter() - started,
            torch.cuda.memory_reserved(device) - before,
        )

    def replay(
        self,
        input_ids: Sequence[int],
        positions: Sequence[int],
        write_slots: Sequence[int],
        rows: Sequence[int],
        device_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:  # (logits [bs, V] in model dtype, padded bs)
        """Run one decode step of len(input_ids) requests from its bucket's graph. Read the
        logits before the next replay: every bucket writes the same buffer. `device_ids` [bs]
        replaces `input_ids` (then placeholders) with ids already on the device, e.g. those
        the previous step is still sampling."""
        bs = len(input_ids)
        padded = self.padded_size(bs)
        if padded is None:
            raise ValueError(f"batch {bs} is above the largest captured bucket {self.max_bs}")
        host = pad_decode_inputs(input_ids, positions, write_slots, rows, padded)
        # Pinned and queued: no stall; the pinned-memory cache keeps `host` until it is copied.
        self.buffers.packed[: host.numel()].copy_(host.pin_memory(), non_blocking=True)
        inputs = self.buffers.columns(padded)
        if device_ids is not None:
            inputs.input_ids[:bs].copy_(device_ids)  # queued after the packed copy above
        self.slots.write(inputs.rows, inputs.positions, inputs.write_slots)
        host_inputs = DecodeInputs(*host.view(NUM_INPUTS, padded).unbind(0))
        self.attention.prepare_for_replay(padded, self.buffers, host_inputs)
        self._graphs[padded].replay()
        return self.buffers.logits[:bs], padded
