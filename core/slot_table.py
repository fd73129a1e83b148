"""The slot table: each running request's KV slots by position, kept on the device.

SGLang's req_to_token pool. Row r, column p holds the slot of token p of the request that owns
row r. Every step scatters its new tokens' write slots into it, so building a step's attention
inputs costs O(new tokens) host work, never O(batch x context); decode kernels read it in place
through a per-request row index (that is what lets a CUDA graph replay any page layout).

Row 0 is the dummy row: all zeros, i.e. slot 0 of the dummy page, for padded requests.
"""

from __future__ import annotations

import torch

from .request import Request, RequestState

DUMMY_ROW = 0


class SlotTable:
    """Contract: a RUNNING request keeps its row; a row is only handed on once its request is
    finished or back in the queue (retracted), and such a request restarts from position 0, so
    the entries [0, kv_len) a step reads were all written by this request's own earlier steps or
    by this step's `write`."""

    def __init__(
        self, num_requests: int, width: int, device: torch.device, scratch_rows: int = 0
    ) -> None:
        self.width = width  # the longest request, in tokens
        # table: [num_requests + 1 + scratch_rows, width] int64; row 0 is the dummy row, the
        # scratch rows after the requests' are the draft-tree nodes' (see `scratch`)
        self.table = torch.zeros(
            num_requests + 1 + scratch_rows, width, dtype=torch.int64, device=device
        )
        self.num_rows = num_requests + 1  # the dummy row and the requests' rows
        self.num_scratch = scratch_rows
        self._free = list(range(num_requests, DUMMY_ROW, -1))
        self._rows: dict[Request, int] = {}

    def scratch(self, i: int) -> int:
        """Scratch row i: a row a step fills for one draft-tree node (its request's prefix, then
        the node's ancestors), read by that node alone and rewritten by the next step."""
        if not 0 <= i < self.num_scratch:
            raise IndexError(f"scratch row {i} of {self.num_scratch}")
        return self.num_rows + i

    def copy_prefix(self, src_rows: torch.Tensor, dst_rows: torch.Tensor, length: int) -> None:
        """table[dst_rows[i], :length] = table[src_rows[i], :length] (device [N] int64 each)."""
        if length > 0:
            view = self.table[:, :length]
            view.index_copy_(0, dst_rows, view.index_select(0, src_rows))

    def row(self, req: Request) -> int:
        """`req`'s row, assigning one on its first step (after retraction: a fresh one)."""
        row = self._rows.get(req)
        if row is None:
            if not self._free:
                self._reclaim()
            row = self._free.pop()
            self._rows[req] = row
        return row

    def _reclaim(self) -> None:
        """Take back the rows of requests that no longer run (finished, aborted, retracted)."""
        for req in [r for r in self._rows if r.state is not RequestState.RUNNING]:
            self._free.append(self._rows.pop(req))
        if not self._free:
            raise RuntimeError(f"more than {self.num_rows - 1} running requests")

    def release(self) -> None:
        """Give the table's memory back (engine shutdown); the table is unusable afterwards."""
        self.table = self.table.new_zeros(0, self.width)
        self._rows.clear()

    def write(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """table[rows[t], positions[t]] = slots[t] for every new token t (device tensors [T])."""
        self.table.view(-1).index_copy_(0, rows * self.width + positions, slots)
