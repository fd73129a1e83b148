"""Attention from FlashInfer's paged kernels (flashinfer-python 0.5.x): `flashinfer` and `fa3`.

Layout: a layer's K (or V) pool [num_slots, Hkv, D] is FlashInfer's NHD paged cache viewed as
[num_pages, page_size, Hkv, D], so nothing is copied; a request's page ids are its slots at
positions 0, ps, 2ps, ... divided by ps (with page_size 1, the slots themselves). FlashInfer
plans on the host from indptr / last_page_len (made from the host lengths, pinned, so every
copy is queued) and reads the page ids on the device, which one Triton kernel builds from the
slot rows (kernels/page_indices.py).

Each step is planned once (`plan`, or the first `forward` of the backend's first step, which is
when the number of query heads is first known) and the plan serves every layer. Decode uses
BatchDecodeWithPagedKVCacheWrapper, with tensor cores where the GQA group is >= 4 (SGLang's
rule; Llama-3's group is 4); extend, prefill and mixed steps use
BatchPrefillWithPagedKVCacheWrapper, causal (FlashInfer aligns each request's queries with the
end of its KV), on FlashInfer's FA2 kernels or, for `fa3`, its Hopper FA3 kernels. `fa3` decodes
with the same decode wrapper as `flashinfer`: FlashInfer's FA3 path is a prefill kernel whose
plan is not made for a captured graph.

CUDA graphs: one decode wrapper per bucket in FlashInfer's CUDA-graph mode (its launch grid is
fixed by the batch size; the split of the KV lives in buffers). `prepare_for_replay` re-plans
the bucket from the step's host KV lengths (host work and queued copies only, through the
compiled scheduler directly: `_replan_bucket`); the graph itself builds the page ids from the
runner's slot table at layer 0.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ...kernels.page_indices import page_indices
from ..kv_cache import KVPool
from ..transfer import to_device
from .base import AttentionBackend, AttentionInputs

if TYPE_CHECKING:
    from ..cuda_graph import DecodeGraphBuffers, DecodeInputs

PREFILL_KERNELS = ("fa2", "fa3")
# Split-KV partials of decode and prefill; one buffer, shared by every wrapper (steps and replays
# run one at a time). SGLang takes 128 MB; the 256-request decode bucket alone plans ~84 MB at
# Llama-3-8B heads, and FlashInfer raises when a plan does not fit, so leave room.
FLOAT_WORKSPACE_BYTES = 256 * 2**20
INT_WORKSPACE_BYTES = 8 * 2**20  # FlashInfer's own default
# The FlashInfer release whose wrapper internals the replay fast path relies on (see
# `_replan_bucket`); any other version replans through the public `plan`.
FAST_REPLAN_VERSION = "0.5.3"


def paged_layout(
    kv_lens: torch.Tensor,  # [B] int, host
    page_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # indptr [B + 1], last_page_len [B]; int32, host
    """FlashInfer's page indptr and last-page fill for requests holding `kv_lens` tokens."""
    lens = kv_lens.to(torch.int32)
    num_pages = (lens + page_size - 1) // page_size
    indptr = torch.zeros(lens.shape[0] + 1, dtype=torch.int32)
    torch.cumsum(num_pages, 0, out=indptr[1:])
    return indptr, lens - (num_pages - 1) * page_size


def use_tensor_core_decode(num_heads: int, num_kv_heads: int) -> bool:
    """SGLang's rule: FlashInfer's tensor-core decode once a KV head serves >= 4 query heads.
    Measured on an H100 at Llama-3-8B heads it is as fast as the CUDA-core kernel from batch 64
    up and faster below (10.6 vs 16.7 us a layer at batch 1, KV 1024)."""
    return num_heads // num_kv_heads >= 4


class FlashInferAttention(AttentionBackend):
    """`prefill_kernels` is "fa2" (--attention-backend flashinfer) or "fa3" (Hopper only);
    `decode_tensor_cores` None follows SGLang's rule (benchmarks may force either kernel).
    Construct through `make_backend`, which checks the device, dtype and head dim first."""

    supports_cuda_graph = True

    def __init__(
        self,
        pool: KVPool,
        prefill_kernels: str = "fa2",
        decode_tensor_cores: bool | None = None,
    ) -> None:
        import flashinfer  # here, not at module import: core/ imports without flashinfer

        if prefill_kernels not in PREFILL_KERNELS:
            raise ValueError(f"prefill_kernels must be one of {PREFILL_KERNELS}")
        super().__init__(pool)
        self._fi = flashinfer
        device = pool.device
        self._float_workspace = torch.zeros(FLOAT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._int_workspace = torch.empty(INT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._prefill = self._share_workspace(
            flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self._float_workspace, "NHD", backend=prefill_kernels
            )
        )
        self._decode: dict[bool, Any] = {}  # eager decode wrappers by tensor cores on/off
        self._num_heads: int | None = None  # learned from init_cuda_graph or the first forward
        self._pending: tuple[Any, ...] | None = None  # a plan waiting for _num_heads
        self._wrapper: Any = None  # what this step's forward runs
        self._graph: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._graph_wrappers: dict[int, Any] = {}
        self._empty_indices = torch.empty(0, dtype=torch.int32, device=device)
        self._decode_tensor_cores = decode_tensor_cores
        self._plan_copied: torch.cuda.Event | None = None  # see _plan_guard

    # ---- per-step planning -------------------------------------------------------------------

    def plan(self, inputs: AttentionInputs) -> None:
        device = self.pool.device
        bsz = inputs.batch_size
        page_size = self.pool.page_size
        self.write_slots = to_device(inputs.write_slots, device)  # [T]
        self._graph = None
        indptr, last_page_len = paged_layout(inputs.kv_lens, page_size)
        kv_lens = inputs.kv_lens.to(torch.int32)
        extend = inputs.extend_lens.to(torch.int32)
        qo_indptr = torch.zeros(bsz + 1, dtype=torch.int32)
        torch.cumsum(extend, 0, out=qo_indptr[1:])
        # [indptr | last_page_len | kv_lens | qo_indptr], pinned: FlashInfer's copies and ours
        # are all queued, none waits for the stream.
        host = torch.cat([indptr, last_page_len, kv_lens, qo_indptr]).pin_memory()
        sizes = [bsz + 1, bsz, bsz, bsz + 1]
        indptr_h, last_h, kv_lens_h, qo_indptr_h = host.split(sizes)
        indptr_d, _, kv_lens_d, _ = to_device(host, device).split(sizes)
        # Page ids: one kernel over the step's slot rows.
        indices = torch.empty(int(indptr[-1]), dtype=torch.int32, device=device)
        kv_slots = to_device(inputs.kv_slots, device)
        page_indices(kv_slots, None, kv_lens_d, indptr_d, page_size, indices)
        if inputs.is_decode:
            self._pending = ("decode", indptr_h, indices, last_h)
        else:
            self._pending = ("prefill", qo_indptr_h, indptr_h, indices, last_h, kv_lens_h)
        if self._num_heads is not None:
            self._plan_pending()

    @contextlib.contextmanager
    def _plan_guard(self) -> Iterator[None]:
        """FlashInfer's plan writes its schedule into a pinned host buffer, then queues the copy
        to the device. With the overlap schedule, the last plan's copy may still wait behind
        the step on the GPU: the buffer is rewritten only once that copy has run."""
        if self._plan_copied is None:
            self._plan_copied = torch.cuda.Event()
        else:
            self._plan_copied.synchronize()
        yield
        self._plan_copied.record()

    def _plan_pending(self) -> None:
        assert self._pending is not None and self._num_heads is not None
        with self._plan_guard():
            self._plan_pending_unguarded()

    def _plan_pending_unguarded(self) -> None:
        assert self._pending is not None and self._num_heads is not None
        kind, *args = self._pending
        self._pending = None
        if kind == "decode":
            indptr, indices, last_page_len = args
            self._wrapper = self._decode_wrapper(self._tensor_cores())
            self._wrapper.plan(
                indptr, indices, last_page_len, *self._plan_shape(), **self._dtypes()
            )
        else:
            qo_indptr, indptr, indices, last_page_len, kv_lens = args
            self._wrapper = self._prefill
            self._prefill.plan(
                qo_indptr,
                indptr,
                indices,
                last_page_len,
                *self._plan_shape(),
                causal=True,
                seq_lens=kv_lens,
                **self._dtypes(),
            )

    def _plan_shape(self) -> tuple[int, int, int, int]:
        spec = self.pool.spec
        assert self._num_heads is not None
        return self._num_heads, spec.num_kv_heads, spec.head_dim, spec.page_size

    def _dtypes(self) -> dict[str, Any]:
        dtype = self.pool.spec.dtype
        return {"q_data_type": dtype, "kv_data_type": dtype, "non_blocking": True}

    def _share_workspace(self, wrapper: Any) -> Any:
        """Every wrapper uses the backend's two device workspaces (each plan rewrites them before
        its run); FlashInfer would otherwise give each of the many graph buckets its own."""
        wrapper.reset_workspace_buffer(self._float_workspace, self._int_workspace)
        return wrapper

    def _tensor_cores(self) -> bool:
        assert self._num_heads is not None
        if self._decode_tensor_cores is not None:
            return self._decode_tensor_cores
        return use_tensor_core_decode(self._num_heads, self.pool.spec.num_kv_heads)

    def _decode_wrapper(self, tensor_cores: bool) -> Any:
        wrapper = self._decode.get(tensor_cores)
        if wrapper is None:
            wrapper = self._share_workspace(
                self._fi.BatchDecodeWithPagedKVCacheWrapper(
                    self._float_workspace, "NHD", use_tensor_cores=tensor_cores
                )
            )
            self._decode[tensor_cores] = wrapper
        return wrapper

    # ---- per-layer attention -----------------------------------------------------------------

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        scale: float,
        kv_written: bool = False,
    ) -> torch.Tensor:  # [T, H, D]
        if not kv_written:
            self.pool.write(layer_id, self.write_slots, k, v)
        if self._pending is not None:  # the backend's first step: now the head count is known
            self._num_heads = int(q.shape[1])
            self._plan_pending()
        if self._graph is not None and layer_id == 0:
            self._graph_page_indices()
        spec = self.pool.spec
        paged = (-1, spec.page_size, spec.num_kv_heads, spec.head_dim)
        k_cache = self.pool.k[layer_id].view(paged)
        v_cache = self.pool.v[layer_id].view(paged)
        # FlashInfer's default scale is 1/sqrt(D); q_scale multiplies it (the plan came first).
        ratio = scale * math.sqrt(spec.head_dim)
        q_scale = None if abs(ratio - 1.0) < 1e-6 else ratio
        return self._wrapper.run(q, (k_cache, v_cache), q_scale=q_scale)

    # ---- CUDA-graph hooks --------------------------------------------------------------------

    def init_cuda_graph(self, buffers: DecodeGraphBuffers, num_heads: int, head_dim: int) -> None:
        # Buckets replay one at a time, so they share one indptr, last_page_len and page-id
        # buffer (each wrapper holds views of the front of them).
        self._num_heads = num_heads
        device = self.pool.device
        max_bs = buffers.max_bs
        max_pages = -(-int(buffers.slot_table.shape[1]) // self.pool.page_size)
        # [indptr (max_bs + 1) | last_page_len (max_bs)]: bucket bs uses the front of each half.
        self._graph_max_bs = max_bs
        self._graph_meta = torch.ones(2 * max_bs + 1, dtype=torch.int32, device=device)
        self._graph_indptr = self._graph_meta[: max_bs + 1]
        self._graph_last_page_len = self._graph_meta[max_bs + 1 :]
        self._graph_indices = torch.zeros(max_bs * max_pages, dtype=torch.int32, device=device)
        self._graph_wrappers = {}
        self._replanned: set[int] = set()  # buckets planned once through the public plan
        self._fast_replan = getattr(self._fi, "__version__", "") == FAST_REPLAN_VERSION
        self._pinned_int_workspace = torch.empty(
            INT_WORKSPACE_BYTES, dtype=torch.uint8, pin_memory=True
        )
        self._qo_range = torch.arange(max_bs + 1, dtype=torch.int32)  # decode: 1 query each
        dtype = self.pool.spec.dtype
        self._dtype_tags = (torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype))

    def _bucket_wrapper(self, bs: int) -> Any:
        wrapper = self._graph_wrappers.get(bs)
        if wrapper is None:
            wrapper = self._share_workspace(
                self._fi.BatchDecodeWithPagedKVCacheWrapper(
                    self._float_workspace,
                    "NHD",
                    use_cuda_graph=True,
                    use_tensor_cores=self._tensor_cores(),
                    paged_kv_indptr_buffer=self._graph_indptr[: bs + 1],
                    paged_kv_indices_buffer=self._graph_indices,
                    paged_kv_last_page_len_buffer=self._graph_last_page_len[:bs],
                )
            )
            self._graph_wrappers[bs] = wrapper
        return wrapper

    def _plan_bucket(self, bs: int, kv_lens: torch.Tensor) -> None:
        """Plan bucket `bs` for `kv_lens` (host); the page ids are the graph's to build."""
        with self._plan_guard():
            self._plan_bucket_unguarded(bs, kv_lens)

    def _plan_bucket_unguarded(self, bs: int, kv_lens: torch.Tensor) -> None:
        indptr, last_page_len = paged_layout(kv_lens, self.pool.page_size)
        self._wrapper = self._bucket_wrapper(bs)
        if self._fast_replan and bs in self._replanned:
            self._replan_bucket(bs, indptr, last_page_len, kv_lens)
            return
        host = torch.cat([indptr, last_page_len]).pin_memory()
        self._wrapper.plan(
            host[: bs + 1],
            self._empty_indices,  # FlashInfer copies these into its buffer; ours writes them
            host[bs + 1 :],
            *self._plan_shape(),
            **self._dtypes(),
        )
        self._replanned.add(bs)

    def _replan_bucket(
        self,
        bs: int,
        indptr: torch.Tensor,  # [bs + 1] int32, host
        last_page_len: torch.Tensor,  # [bs] int32, host
        kv_lens: torch.Tensor,  # [bs] int, host
    ) -> None:
        """What the public `plan` of a CUDA-graph decode wrapper does on a replay, without
        its Python-side work (measured 1.4 ms a replay at batch 256 on FlashInfer 0.5.3, which
        includes a Python max() over the lengths; SGLang skips it the same way): one queued
        copy of indptr and last_page_len into the fixed buffers, then the compiled scheduler,
        whose plan info the captured kernels read from the shared int workspace. Relies on two
        wrapper internals (`_cached_module`, `_plan_info`), hence FAST_REPLAN_VERSION."""
        max_bs = self._graph_max_bs
        host = torch.empty(max_bs + 1 + bs, dtype=torch.int32, pin_memory=True)
        host[: bs + 1] = indptr
        host[max_bs + 1 :] = last_page_len
        self._graph_meta[: max_bs + 1 + bs].copy_(host, non_blocking=True)
        heads, kv_heads, head_dim, page_size = self._plan_shape()
        wrapper = self._wrapper
        workspaces = (self._float_workspace, self._int_workspace, self._pinned_int_workspace)
        if wrapper.use_tensor_cores:  # the prefill scheduler, one query row per request
            plan_info = wrapper._cached_module.plan(
                *workspaces,
                self._qo_range[: bs + 1],
                indptr,
                kv_lens.to(torch.int32),
                bs,  # total query rows
                bs,
                heads,
                kv_heads,
                page_size,
                True,  # CUDA graph: the launch grid depends on bs alone
                head_dim,
                head_dim,
                False,  # causal
                -1,  # window_left
                -1,  # fixed_split_size
                False,  # disable_split_kv
                0,  # num_colocated_ctas
            )
        else:
            plan_info = wrapper._cached_module.plan(
                *workspaces,
                indptr,
                bs,
                heads,
                kv_heads,
                page_size,
                True,  # CUDA graph
                -1,  # window_left
                0.0,  # logits_soft_cap
                head_dim,
                head_dim,
                *self._dtype_tags,
            )
        wrapper._plan_info = plan_info

    def prepare_for_capture(self, bs: int, buffers: DecodeGraphBuffers) -> None:
        assert self._num_heads is not None, "init_cuda_graph first"
        inputs = buffers.columns(bs)
        self._pending = None
        self.write_slots = inputs.write_slots
        self._graph = (buffers.slot_table, inputs.rows, inputs.kv_lens)
        # Capture-time inputs are all padding: one token of KV each. The grid FlashInfer
        # launches in graph mode depends on the batch size alone.
        self._plan_bucket(bs, torch.ones(bs, dtype=torch.int64))

    def prepare_for_replay(
        self, bs: int, buffers: DecodeGraphBuffers, host: DecodeInputs | None = None
    ) -> None:
        """Re-plan the bucket for this step's KV lengths (host work and queued copies only)."""
        kv_lens = host.kv_lens if host is not None else buffers.columns(bs).kv_lens.cpu()
        self._plan_bucket(bs, kv_lens)

    def _graph_page_indices(self) -> None:
        assert self._graph is not None
        slot_table, rows, kv_lens = self._graph
        bs = int(rows.shape[0])
        indptr = self._graph_indptr[: bs + 1]
        page_indices(slot_table, rows, kv_lens, indptr, self.pool.page_size, self._graph_indices)
