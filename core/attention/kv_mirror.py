"""Contiguous per-request copies of the paged KV, for batched decode in the torch backend (CPU).

Without a paged-attention kernel, the torch backend gathers every request's KV out of the pool
into a padded [B, Hkv, Kmax, D] tensor for SDPA: two `index_select`s per layer and step that copy
the whole batch's KV again, though only one token per request is new. On the 2-core CPU box, at
32 requests that gather was ~7% of a decode step with ~100 tokens of context and ~25% with 400.

The mirror keeps each decoding request's KV in a row of its own, head-major, so that SDPA reads
the batch as a strided view with no copy: per step it only appends the new token (one indexed
store per layer for K and one for V, as the pool write does). The pool stays the
source of truth; a row is (re)filled from it whenever it does not hold exactly the request's
KV before this step, and its memory is bounded (`max_tokens` rows x width), beyond which the
backend falls back to the gather.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..kv_cache import KVPool

_MIN_ROWS, _MIN_WIDTH = 8, 64


@dataclass(frozen=True)
class MirrorPlan:
    """One decode step over the mirror: request b sits in mirror row `rows[b]`."""

    rows: torch.Tensor  # [B] int64 mirror rows, in batch order
    in_order: bool  # rows is 0..B-1: queries and outputs need no reordering
    span: int  # rows [0, span) take part (rows of other requests are masked to one key)
    kv_len: int  # the longest request's KV after this step: the keys' width
    positions: torch.Tensor  # [B] int64 where each request's new token goes
    mask: torch.Tensor | None  # [span, 1, 1, kv_len] bool; None when every row is full


class DecodeKVMirror:
    """Contract: `plan_decode(rows, kv_lens, kv_slots)` gets the slot-table row of each request of
    a decode step, its KV length after the step and its slots; the pool then holds each
    request's KV [0, kv_len - 1) and the step writes position kv_len - 1. Any other change to a
    request's KV (an extend step, a verify pass, slots copied in the pool) must reach the mirror
    as `invalidate(rows)` or `invalidate()` before its next decode step; `KVPool.copy_slots` is
    caught by itself (the pool's epoch). A row whose mirror copy is not exactly its KV before
    the step is refilled from the pool, so a missed step costs a refill, never a wrong read."""

    def __init__(self, pool: KVPool, max_tokens: int) -> None:
        self.pool = pool
        self.max_tokens = max_tokens  # rows x width, summed over the mirror's rows
        self.k: list[torch.Tensor] = []  # per layer [rows, Hkv, width, D]
        self.v: list[torch.Tensor] = []
        self.rows = self.width = 0
        self._entries: dict[int, list[int]] = {}  # slot-table row -> [mirror row, kv length]
        self._free: list[int] = []  # heap of free mirror rows below self._next
        self._next = 0
        self._epoch = pool.epoch

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def invalidate(self, rows: Iterable[int] | None = None) -> None:
        """Forget the copies of these slot-table rows (all of them when None)."""
        if rows is None:
            self._entries.clear()
            self._free, self._next = [], 0
            return
        for row in rows:
            entry = self._entries.pop(row, None)
            if entry is not None:
                heapq.heappush(self._free, entry[0])

    def release(self) -> None:
        self.invalidate()
        self.k, self.v, self.rows, self.width = [], [], 0, 0

    def plan_decode(
        self,
        rows: Sequence[int],  # [B] slot-table rows
        kv_lens: Sequence[int],  # [B] KV length after this step
        kv_slots: torch.Tensor,  # [B, >= max(kv_lens)] the requests' slots, host or pool device
    ) -> MirrorPlan | None:
        """Assign mirror rows, refill stale ones from the pool; None when the batch does not fit
        in `max_tokens` (the caller gathers instead; the mirror's memory is given back)."""
        if self.pool.epoch != self._epoch:
            self.invalidate()
            self._epoch = self.pool.epoch
        in_batch = set(rows)
        self.invalidate([r for r in self._entries if r not in in_batch])  # finished, or paused
        index: list[int] = []
        stale: list[int] = []  # batch positions whose mirror row must be refilled
        for b, (row, kv_len) in enumerate(zip(rows, kv_lens, strict=True)):
            entry = self._entries.get(row)
            if entry is None:
                entry = self._entries[row] = [self._take_row(), 0]
            if entry[1] != kv_len - 1:
                stale.append(b)
            entry[1] = kv_len
            index.append(entry[0])
        span, width = max(index) + 1, max(kv_lens)
        if span > self.rows or width > self.width:
            if not self._grow(span, width):
                self.release()
                return None
            stale = list(range(len(rows)))  # the new buffers hold nothing yet
        if stale:
            self._refill(stale, index, kv_lens, kv_slots)
        return self._plan(index, kv_lens, span, width)

    def write_and_view(
        self,
        layer: int,
        plan: MirrorPlan,
        k: torch.Tensor,  # [B, Hkv, D] the step's new keys
        v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # keys, values: [span, Hkv, kv_len, D] views
        # One indexed store per tensor, straight from the strided q|k|v split (no reshape copy).
        self.k[layer][plan.rows, :, plan.positions] = k
        self.v[layer][plan.rows, :, plan.positions] = v
        keys = self.k[layer][: plan.span, :, : plan.kv_len]
        return keys, self.v[layer][: plan.span, :, : plan.kv_len]

    # ---- internals -------------------------------------------------------------------------

    def _take_row(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self._next += 1
        return self._next - 1

    def _grow(self, span: int, width: int) -> bool:
        rows = max(self.rows, _MIN_ROWS)
        while rows < span:
            rows *= 2
        wide = max(self.width, _MIN_WIDTH)
        while wide < width:
            wide *= 2
        if rows * wide > self.max_tokens:
            return False
        spec = self.pool.spec
        shape = (rows, spec.num_kv_heads, wide, spec.head_dim)
        self.k, self.v = [], []  # drop the old buffers before the new ones are made
        # Zeroed (calloc: untouched pages cost nothing): masked-off rows must read finite values.
        self.k = [torch.zeros(shape, dtype=spec.dtype) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype) for _ in range(spec.num_layers)]
        self.rows, self.width = rows, wide
        return True

    def _refill(
        self,
        stale: list[int],
        index: list[int],
        kv_lens: Sequence[int],
        kv_slots: torch.Tensor,
    ) -> None:
        """Copy positions [0, kv_len - 1) of the stale requests from the pool, every layer."""
        known = max(kv_lens[b] - 1 for b in stale)
        if known == 0:
            return
        pick = torch.tensor(stale, dtype=torch.int64, device=kv_slots.device)
        slots = kv_slots[:, :known].index_select(0, pick).reshape(-1).to(self.pool.device)
        dest = torch.tensor([index[b] for b in stale], dtype=torch.int64)
        shape = (len(stale), known, self.pool.spec.num_kv_heads, self.pool.spec.head_dim)
        # Past a request's own length the copied slots are padding: masked, never read.
        for pool_buf, mirror in ((self.pool.k, self.k), (self.pool.v, self.v)):
            for layer, src in enumerate(pool_buf):
                got = src.index_select(0, slots).view(shape).transpose(1, 2)  # [S, Hkv, n, D]
                mirror[layer][:, :, :known].index_copy_(0, dest, got)

    def _plan(self, index: list[int], kv_lens: Sequence[int], span: int, width: int) -> MirrorPlan:
        rows = torch.tensor(index, dtype=torch.int64)
        batch_lens = torch.tensor(kv_lens, dtype=torch.int64)
        lens = torch.ones(span, dtype=torch.int64)  # rows outside the batch: one (zero) key
        lens[rows] = batch_lens
        mask = None
        if bool((lens != width).any()):
            mask = (torch.arange(width)[None, :] < lens[:, None])[:, None, None, :]
        in_order = index == list(range(len(index)))
        return MirrorPlan(rows, in_order, span, width, batch_lens - 1, mask)
