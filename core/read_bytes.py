"""The bytes a forward pass must read from memory at least: every weight it multiplies by, once,
and the KV of every position its attention looks at, once. Decode is bound by these reads, so
bytes read / step time, against what the memory can deliver, says how close a step runs to its
floor (the workshop's yardstick). An estimate from shapes, not a hardware counter: activations,
KV writes and re-reads from cache are left out, which is small for decode and large for prefill.

Which bytes a weight costs depends on the path its product takes for that many rows: a GGUF
checkpoint's 4- or 8-bit blocks on CPU (gguf_blocks), else the weight itself (fp32 on CPU, bf16
or fp16 on GPU; MKL's packed copy holds the same elements).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import KVPoolSpec
from .models.gguf_blocks import BlockWeight
from .models.llama import Linear, LlamaForCausalLM, RMSNorm
from .scheduler import ScheduledBatch


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _product_bytes(
    weight: torch.Tensor, bias: torch.Tensor | None, blocks: BlockWeight | None, rows: int
) -> int:
    if blocks is not None and blocks.applies(rows):
        return _nbytes(blocks.blocks) + _nbytes(blocks.bias)
    return _nbytes(weight) + _nbytes(bias)


def weight_bytes(model: LlamaForCausalLM, rows: int, logit_rows: int) -> int:
    """Weights a forward pass over `rows` tokens reads, `logit_rows` of them through the LM head:
    every layer's projections and norms, the final norm, the LM head, and the embedding rows."""
    total = 0
    for module in model.layers.modules():
        if isinstance(module, Linear):
            total += _product_bytes(module.weight, module.bias, module.blocks, rows)
        elif isinstance(module, RMSNorm):
            total += _nbytes(module.weight)
    total += _nbytes(model.norm.weight)
    if logit_rows:
        total += _product_bytes(model.lm_head_weight, None, model.lm_head_blocks, logit_rows)
    embed = model.embed_tokens.weight
    return total + rows * embed.shape[1] * embed.element_size()


def kv_bytes_per_position(spec: KVPoolSpec) -> int:
    """K and V of one position in every layer."""
    return spec.bytes_per_page // spec.page_size


@dataclass
class StepReads:
    """Bytes read per step for one loaded model and KV pool. Weight bytes depend only on the row
    counts, so they are computed once per (rows, logit rows) pair: a decode step costs a dict
    lookup. Contract: the model's weights are not swapped after construction (a hot restart that
    rebuilds the model builds a new StepReads)."""

    model: LlamaForCausalLM
    kv_position_bytes: int
    _weights: dict[tuple[int, int], int] = field(default_factory=dict)

    def weights(self, rows: int, logit_rows: int) -> int:
        key = (rows, logit_rows)
        cached = self._weights.get(key)
        if cached is None:
            cached = self._weights[key] = weight_bytes(self.model, rows, logit_rows)
        return cached

    def of_batch(self, batch: ScheduledBatch, drafted: int = 0) -> int:
        """One step over `batch`, with `drafted` draft tokens verified in it."""
        rows = batch.num_tokens + drafted
        logit_rows = drafted + sum(chunk.samples for chunk in batch.chunks)
        # attention reads [0, end) of each chunk's request; a verified draft token attends to its
        # request's context and the drafts before it, counted once each
        kv = drafted + sum(chunk.end for chunk in batch.chunks)
        return self.weights(rows, logit_rows) + kv * self.kv_position_bytes
