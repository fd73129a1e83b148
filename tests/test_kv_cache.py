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
