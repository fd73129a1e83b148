"""Decode CUDA graphs for an EAGLE head's draft steps.

After the catch-up pass (an extend, eager), every draft step is decode-shaped: one token per
row, each row reading its own slot-table row (a request's, or a tree node's scratch row), plus
the hidden state the head feeds itself. A step is a handful of small kernels, so eager it costs
mostly launches and host time; replayed from a graph it costs the weight reads. The buckets,
padding and attention hooks are the target's (cuda_graph.py); the head's extra input is one
static hidden buffer, and each bucket's outputs are the tensors its capture produced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..attention.base import AttentionBackend
from ..cuda_graph import NUM_INPUTS, DecodeGraphBuffers, DecodeGraphRunner
from ..slot_table import SlotTable
from .eagle_head import EagleHead


class HeadGraphRunner(DecodeGraphRunner):
    """Contract: `run` gives the head's (logits [bs, V], hidden [bs, H]) in the head's dtype
    for decode rows, valid until the next `run`; rows above the largest bucket run eager.
    `hidden_width` is what the rows feed in: H for draft steps, the target's features (fc's
    input) for catch-up rows. One runner per attention backend object: capturing sets up the
    backend's graph workspaces."""

    model: EagleHead

    def __init__(
        self,
        head: EagleHead,
        attention: AttentionBackend,
        slots: SlotTable,
        max_bs: int,
        hidden_width: int,
    ) -> None:
        self.hidden_width = hidden_width
        super().__init__(head, attention, slots, max_bs)

    def _make_buffers(self, max_bs: int) -> DecodeGraphBuffers:
        head, device = self.model, self.slots.table.device
        dtype = head.fc.weight.dtype
        self.hidden = torch.zeros(max_bs, self.hidden_width, dtype=dtype, device=device)
        self.hidden_out = torch.zeros(max_bs, head.config.hidden_size, dtype=dtype, device=device)
        self.gather = torch.arange(max_bs, device=device)
        # Shared by every bucket; a reduced vocabulary's other columns stay -inf.
        logits = torch.full(
            (max_bs, head.config.vocab_size), float("-inf"), dtype=dtype, device=device
        )
        return DecodeGraphBuffers(
            packed=torch.zeros(NUM_INPUTS * max_bs, dtype=torch.int64, device=device),
            slot_table=self.slots.table,
            logits=logits,
        )

    def _forward(self, bs: int) -> None:
        inputs = self.buffers.columns(bs)
        self.model(
            inputs.input_ids,
            inputs.positions,
            self.attention,
            self.gather[:bs],
            hidden=self.hidden[:bs],
            out=(self.buffers.logits[:bs], self.hidden_out[:bs]),
        )

    def run(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        write_slots: Sequence[int],
        rows: Sequence[int],
        hidden: torch.Tensor,  # [bs, H]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bs = len(ids)
        self.hidden[:bs].copy_(hidden)
        logits, _ = self.replay(ids, positions, write_slots, rows)
        return logits, self.hidden_out[:bs]
