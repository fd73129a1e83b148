"""The torch backend's decode mirror (CPU): attention read from per-request contiguous copies of
the KV must equal attention gathered from the paged pool, through every way the copies can go
stale: requests joining and leaving, rows handed on, batch order changes, extend steps, draft
passes, slots copied in the pool, growth, and a batch too big for its budget."""

from __future__ import annotations

import torch

from llmconsole.core.attention.base import AttentionInputs
from llmconsole.core.attention.torch_backend import TorchAttention
from llmconsole.core.kv_cache import KVPool, KVPoolSpec

LAYERS, KV_HEADS, HEADS, DIM = 2, 2, 6, 8


class Twin:
    """Two pools fed the same writes: one read through the mirror, one by gathering."""

    def __init__(self, num_slots: int = 512, mirror_tokens: int | None = None) -> None:
        spec = KVPoolSpec(LAYERS, KV_HEADS, DIM, 1, num_slots, torch.float32)
        self.pools = (KVPool(spec, torch.device("cpu")), KVPool(spec, torch.device("cpu")))
        self.mirrored = TorchAttention(self.pools[0], decode_mirror=True)
        self.gathered = TorchAttention(self.pools[1], decode_mirror=False)
        mirror = self.mirrored.mirror
        assert mirror is not None and self.gathered.mirror is None
        if mirror_tokens is not None:
            mirror.max_tokens = mirror_tokens
        self.gen = torch.Generator().manual_seed(0)
        free = torch.randperm(num_slots - 1, generator=self.gen) + 1  # slot 0: the dummy
        self.free = free.tolist()
        self.slots: dict[int, list[int]] = {}  # request (slot-table row) -> its slots

    def step(self, batch: list[tuple[int, int]], rows: bool = True) -> bool:
        """batch: (row, new tokens) per request; new rows start from nothing. Runs one step on
        both backends, checks every layer's output matches; True when the mirror was read."""
        prefix = [len(self.slots.setdefault(r, [])) for r, _ in batch]
        for r, n in batch:
            self.slots[r] += [self.free.pop() for _ in range(n)]
        kv_lens = [len(self.slots[r]) for r, _ in batch]
        width = max(kv_lens)
        padded = [self.slots[r] + [0] * (width - len(self.slots[r])) for r, _ in batch]
        kv_slots = torch.tensor(padded)
        pairs = zip(batch, prefix, strict=True)
        write = [s for (r, n), p in pairs for s in self.slots[r][p : p + n]]
        inputs = AttentionInputs(
            prefix_lens=torch.tensor(prefix),
            extend_lens=torch.tensor([n for _, n in batch]),
            kv_slots=kv_slots,
            write_slots=torch.tensor(write),
            is_decode=all(n == 1 for _, n in batch),
            rows=tuple(r for r, _ in batch) if rows else None,
        )
        for backend in (self.mirrored, self.gathered):
            backend.plan(inputs)
        tokens = len(write)
        for layer in range(LAYERS):
            q = torch.randn(tokens, HEADS, DIM, generator=self.gen)
            k = torch.randn(tokens, KV_HEADS, DIM, generator=self.gen)
            v = torch.randn(tokens, KV_HEADS, DIM, generator=self.gen)
            got = self.mirrored.forward(layer, q, k, v, DIM**-0.5)
            want = self.gathered.forward(layer, q, k, v, DIM**-0.5)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # Decode steps planned for the C path (kernels/cpu_attention.c) plan the mirror on the
        # first `forward`, as for a model with q/k norm, which never takes the C path.
        return self.mirrored._mirror_plan is not None

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        for pool in self.pools:
            pool.copy_slots(torch.tensor(src), torch.tensor(dst))


def decode(rows: list[int]) -> list[tuple[int, int]]:
    return [(r, 1) for r in rows]


def test_mirror_reads_equal_the_gathered_pool_as_requests_come_and_go() -> None:
    twin = Twin()
    twin.step([(1, 5), (2, 9), (3, 3)])  # prefill
    for _ in range(3):
        assert twin.step(decode([1, 2, 3]))
    twin.step([(4, 7)])  # a fourth request joins ...
    assert twin.step(decode([1, 2, 3, 4]))  # ... and is filled from the pool
    assert twin.step(decode([1, 3, 4]))  # request 2 finished: a hole in the mirror
    del twin.slots[2]
    twin.step([(2, 4)])  # its row is handed on to a new request: a prefill from nothing
    assert twin.step(decode([2, 4, 1, 3]))  # in another order than the mirror's rows
    assert twin.step(decode([3, 1, 4, 2]))
    assert twin.step(decode([1]))  # a lone request on scattered slots reads the mirror too


def test_extend_steps_draft_passes_and_copied_slots_make_the_mirror_refill() -> None:
    twin = Twin()
    twin.step([(1, 6), (2, 6)])
    assert twin.step(decode([1, 2]))
    twin.step([(1, 3)])  # a chunk of new tokens for request 1 (e.g. a verify pass's)
    assert twin.step(decode([1, 2]))
    twin.step(decode([1, 2]), rows=False)  # a draft pass: which rows it touched is unknown
    assert twin.step(decode([1, 2]))
    # The pool rewrites request 2's first slots behind the backend's back.
    twin.copy_slots(twin.slots[1][:4], twin.slots[2][:4])
    assert twin.step(decode([1, 2]))
    # Row 2 is handed on to a request whose prompt is exactly as long as the KV the mirror
    # holds for that row: only the extend step tells the two apart.
    held = len(twin.slots.pop(2))
    twin.step([(2, held)])
    assert twin.step(decode([1, 2]))


def test_the_mirror_grows_with_the_batch_and_the_context() -> None:
    twin = Twin(num_slots=4096)
    twin.step([(r, 3) for r in range(1, 4)])
    assert twin.step(decode([1, 2, 3]))
    mirror = twin.mirrored.mirror
    assert mirror is not None
    rows, width = mirror.rows, mirror.width
    twin.step([(r, 70) for r in range(4, 13)])  # more requests than rows, longer than wide
    assert twin.step(decode(list(range(1, 13))))
    assert mirror.rows > rows and mirror.width > width >= 3


def test_a_batch_over_the_budget_gathers_and_gives_the_memory_back() -> None:
    twin = Twin(mirror_tokens=8 * 64)
    twin.step([(1, 10), (2, 10)])
    assert twin.step(decode([1, 2]))
    mirror = twin.mirrored.mirror
    assert mirror is not None and mirror.allocated_bytes > 0
    twin.step([(3, 70)])  # a request past 64 tokens: 8 rows x 128 > 512 tokens
    assert not twin.step(decode([1, 2, 3]))
    assert mirror.allocated_bytes == 0
    assert twin.step(decode([1, 2]))  # back under the budget: mirrored again


def test_released_backend_holds_no_mirror_memory() -> None:
    twin = Twin()
    twin.step([(1, 4), (2, 4)])
    assert twin.step(decode([1, 2]))
    mirror = twin.mirrored.mirror
    assert mirror is not None and mirror.allocated_bytes > 0
    twin.mirrored.release()
    assert mirror.allocated_bytes == 0
