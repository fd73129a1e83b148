from __future__ import annotations

import pytest

from llmconsole.core.kv_cache import OutOfPages, PageAllocator, pages_needed, slots_for_positions


def test_allocator_hands_out_each_page_once_and_never_the_dummy() -> None:
    alloc = PageAllocator(9)
    pages = alloc.alloc(8)
    assert sorted(pages) == list(range(1, 9))
    assert alloc.num_free == 0
    with pytest.raises(OutOfPages):
        alloc.alloc(1)
    alloc.check_integrity([pages])


def test_a_freed_run_comes_back_ascending_for_the_next_request() -> None:
    """Back-to-back lone requests (batch-1 decode) get one contiguous ascending run of pages
    each time, which the CPU attention reads as a view instead of gathering it per layer."""
    alloc = PageAllocator(64)
    first = alloc.alloc(5) + alloc.alloc(1) + alloc.alloc(1)  # a prefill, then two decode steps
    assert first == list(range(1, 8))
    alloc.free(first)
    second = alloc.alloc(3) + [alloc.alloc(1)[0] for _ in range(6)]
    assert second == list(range(1, 10))
    alloc.free(second[4:])  # a retraction keeps the front
    assert alloc.alloc(5) == list(range(5, 10))
    alloc.check_integrity([second[:4], list(range(5, 10))])


def test_double_free_is_an_error() -> None:
    alloc = PageAllocator(4)
    pages = alloc.alloc(2)
    alloc.free(pages)
    with pytest.raises(RuntimeError, match="freed twice"):
        alloc.free(pages[:1])
    alloc.check_integrity()


def test_integrity_catches_a_leaked_page() -> None:
    alloc = PageAllocator(6)
    a = alloc.alloc(2)
    alloc.alloc(1)  # nobody owns this one
    with pytest.raises(AssertionError, match="not owned"):
        alloc.check_integrity([a])


def test_integrity_catches_a_shared_page() -> None:
    alloc = PageAllocator(6)
    a = alloc.alloc(2)
    with pytest.raises(AssertionError, match="two requests"):
        alloc.check_integrity([a, a[:1]])


def test_slot_mapping_with_pages() -> None:
    assert pages_needed(0, 4) == 0 and pages_needed(5, 4) == 2
    # page 3 holds positions 0..3, page 7 holds 4..7
    assert slots_for_positions([3, 7], 2, 6, 4) == [14, 15, 28, 29]
    assert slots_for_positions([5, 9, 2], 0, 3, 1) == [5, 9, 2]
