"""The paged KV pool and its page allocator.

K and V live in one flat slot array per layer; a page is `page_size` consecutive slots, and a
request's page table maps its token positions onto slots. Page 0 is the dummy page: padded rows
(CUDA-graph padding, padded queries) read and write it, so it is never handed to a request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


class OutOfPages(RuntimeError):
    """Raised by `alloc` when asked for more pages than are free; the scheduler checks first."""


class PageAllocator:
    """Contract: a usable page is either free or owned by exactly one request; `free` of a page
    that is not allocated raises (pages are freed exactly once); page 0 is never handed out."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (1 dummy + 1 usable), got {num_pages}")
        self.num_pages = num_pages
        # Pop from the end: low page ids first, which keeps small runs contiguous.
        self._free: list[int] = list(range(num_pages - 1, 0, -1))
        self._allocated: set[int] = set()

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._allocated)

    def can_alloc(self, n: int) -> bool:
        return n <= len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._allocated.update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        # Pushed last page first, so the next allocs pop them in their old order: a request
        # that follows a finished one gets the same ascending run of pages, which the CPU
        # attention backend reads as a view of the pool instead of gathering it every layer.
        for page in reversed(list(pages)):
            if page not in self._allocated:
                raise RuntimeError(f"page {page} freed twice or never allocated")
            self._allocated.remove(page)
            self._free.append(page)

    def check_integrity(self, owned: Iterable[Iterable[int]] = ()) -> None:
        """Every page is free xor allocated; `owned` (live requests' page lists) covers exactly
        the allocated set with no page shared. Tests call it; the engine calls it when idle."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not (free & self._allocated), "a page is both free and allocated"
        assert free | self._allocated == set(range(1, self.num_pages)), "a page went missing"
        seen: set[int] = set()
        for pages in owned:
            for page in pages:
                assert page not in seen, f"page {page} owned by two requests"
                seen.add(page)
        assert seen == self._allocated, (
            f"allocated pages not owned by any live request: {sorted(self._allocated - seen)[:8]}"
        )


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


@dataclass(frozen=True)
class KVPoolSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int  # including the dummy page
    dtype: torch.dtype

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def bytes_per_page(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem

    @staticmethod
    def for_budget(
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: torch.dtype,
        *,
        max_tokens: int | None = None,
        max_bytes: int | None = None,
    ) -> KVPoolSpec:
        """Size the pool from a token budget (CPU) or a byte budget (GPU free memory)."""
        spec = KVPoolSpec(num_layers, num_kv_heads, head_dim, page_size, 2, dtype)
        if max_tokens is not None:
            usable = pages_needed(max_tokens, page_size)
        elif max_bytes is not None:
            usable = max_bytes // spec.bytes_per_page - 1
        else:
            raise ValueError("need max_tokens or max_bytes to size the KV pool")
        if usable < 1:
            raise ValueError("the KV budget is too small for a single page")
        return KVPoolSpec(num_layers, num_kv_heads, head_dim, page_size, usable + 1, dtype)


# --kv-cache-dtype (SGLang's names) -> the pool's element type; "auto" is the model's dtype.
KV_CACHE_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


_FP8 = frozenset(KV_CACHE_DTYPES.values())


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 buffers as bytes: copies that move elements unchanged need no fp8 kernel (CPU
    has none for index_copy_)."""
    return t.view(torch.uint8) if t.dtype in _FP8 else t


class KVPool:
    """K/V buffers of every layer: k[layer], v[layer]: [num_slots, Hkv, D], in the model's
    dtype or fp8 (--kv-cache-dtype: half the bytes of bf16 per token, no scales, as SGLang's
    default); attention widens fp8 to the query's dtype as it reads."""

    def __init__(self, spec: KVPoolSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        # Bumped by every bulk rewrite of slots (`copy_slots`): caches of the pool's contents
        # (the torch backend's decode mirror) compare it to know they are stale.
        self.epoch = 0
        shape = (spec.num_slots, spec.num_kv_heads, spec.head_dim)
        # Uninitialised (fast, and untouched memory is never committed on CPU); only the dummy
        # page is zeroed, because padded rows read it and 0 * NaN would poison their neighbours.
        self.k = [
            torch.empty(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)
        ]
        self.v = [
            torch.empty(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)
        ]
        for buf in (*self.k, *self.v):
            _raw(buf[: spec.page_size]).zero_()

    @property
    def page_size(self) -> int:
        return self.spec.page_size

    def release(self) -> None:
        """Drop the buffers (at shutdown / before a rebuild) so their memory can be reused."""
        self.k.clear()
        self.v.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def write(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots: [T]; k, v: [T, Hkv, D]
        if self.spec.dtype in _FP8:  # narrowed here, stored as bytes
            k, v = _raw(k.to(self.spec.dtype)), _raw(v.to(self.spec.dtype))
            _raw(self.k[layer_id]).index_copy_(0, slots, k)
            _raw(self.v[layer_id]).index_copy_(0, slots, v)
            return
        self.k[layer_id].index_copy_(0, slots, k)
        self.v[layer_id].index_copy_(0, slots, v)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """K/V of slots `src` -> slots `dst`, every layer (sources are read before any write)."""
        self.epoch += 1
        for buf in (*self.k, *self.v):
            raw = _raw(buf)
            raw.index_copy_(0, dst, raw.index_select(0, src))


def slots_for_positions(pages: list[int], start: int, end: int, page_size: int) -> list[int]:
    """Slots of token positions [start, end) of a request whose page table is `pages`."""
    if page_size == 1:
        return pages[start:end]
    return [pages[p // page_size] * page_size + p % page_size for p in range(start, end)]
