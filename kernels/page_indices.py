"""FlashInfer's paged-KV layout built on the device from our slot rows; torch reference below.

FlashInfer reads a request's KV through page ids: request i owns `indices[indptr[i]:indptr[i+1]]`,
its last page holding `last_page_len[i]` tokens. Our slot rows map each position to a slot
(slot = page * page_size + offset), so page j of a request is the slot at position j * page_size
divided by page_size (page_size 1: the slots themselves). One program per request copies its
page ids out of its row, with no host gather and no device sync, so a CUDA graph replays it for
any KV lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _page_indices_kernel(
    slots_ptr,  # [R, W] int64 slot rows
    rows_ptr,  # [B] row of slots_ptr per request; read only when HAS_ROWS
    kv_lens_ptr,  # [B] int
    indptr_ptr,  # [B + 1] int32
    out_ptr,  # [indptr[B]] int32 page ids
    stride_row,
    page_size,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    req = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + req).to(tl.int64)
    else:
        row = req.to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + req)
    num_pages = tl.cdiv(kv_len, page_size)
    start = tl.load(indptr_ptr + req).to(tl.int64)
    for first in range(0, num_pages, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        mask = offs < num_pages
        slot = tl.load(slots_ptr + row * stride_row + offs * page_size, mask=mask, other=0)
        tl.store(out_ptr + start + offs, (slot // page_size).to(tl.int32), mask=mask)


def page_indices(
    slots: torch.Tensor,  # [R, W] int64
    rows: torch.Tensor | None,  # [B] int: request i reads row rows[i] (None: row i)
    kv_lens: torch.Tensor,  # [B] int
    indptr: torch.Tensor,  # [B + 1] int32, the pages' prefix sum
    page_size: int,
    out: torch.Tensor,  # [>= total pages] int32, written in place
) -> torch.Tensor:
    batch = kv_lens.shape[0]
    assert slots.stride(1) == 1 and indptr.dtype == out.dtype == torch.int32
    if batch == 0:
        return out
    _page_indices_kernel[(batch,)](
        slots,
        rows if rows is not None else kv_lens,  # a placeholder pointer, never read
        kv_lens,
        indptr,
        out,
        slots.stride(0),
        page_size,
        HAS_ROWS=rows is not None,
        BLOCK=_BLOCK,
    )
    return out


def page_indices_ref(
    slots: torch.Tensor,
    rows: torch.Tensor | None,
    kv_lens: torch.Tensor,
    page_size: int,
) -> torch.Tensor:  # [total pages] int32
    """Request by request on the host: slow and obviously right."""
    pages = []
    for i, kv_len in enumerate(kv_lens.tolist()):
        row = slots[int(rows[i]) if rows is not None else i]
        pages.append(row[: int(kv_len) : page_size] // page_size)
    return torch.cat(pages).to(torch.int32) if pages else torch.zeros(0, dtype=torch.int32)
