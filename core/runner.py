"""ModelRunner: turns a scheduled batch into tensors, runs the model once, samples.

It owns the model, the KV pool, the attention backend, the slot table and the decode CUDA graphs;
the scheduler owns which requests run. Host work per step is O(new tokens): the KV slots of
earlier tokens already sit in the device slot table. Decode batches replay a captured graph when
one holds them (`StepOutput.cuda_graph`, `padded_bs`). Speculative verify passes
(core/spec/chain_verify.py, tree_verify.py) run through `run_tokens`, `run_rows` and the graphs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .attention.base import AttentionBackend, AttentionInputs
from .cuda_graph import CaptureReport, DecodeGraphRunner
from .kv_cache import KVPool, slots_for_positions
from .models.llama import LlamaForCausalLM
from .request import Request
from .sampling import SamplingBatch, sample
from .scheduler import ScheduledBatch
from .slot_table import SlotTable
from .transfer import int64_to_device


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class StepOutput:
    """One sampled token per chunk that reached its request's end (chunk order), else None."""

    tokens: tuple[int | None, ...]
    logprobs: tuple[TokenLogprob | None, ...]
    cuda_graph: bool
    padded_bs: int
    # per chunk: (first prompt position scored, logprobs of prompt tokens from there) or None
    prompt_logprobs: tuple[tuple[int, tuple[TokenLogprob, ...]] | None, ...] = ()
    # per chunk, when the model captures features (EAGLE): [chunk tokens, F] of its positions
    features: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class VerifyOutput:
    """A speculative verify pass: per chunk, the tokens to emit (its accepted drafts, then the
    target's own next token) and how many drafts were accepted."""

    tokens: tuple[tuple[int, ...], ...]
    accepted: tuple[int, ...]
    logprobs: tuple[tuple[TokenLogprob | None, ...], ...]  # per chunk, per emitted token
    cuda_graph: bool = False
    padded_bs: int = 0
    # per chunk, when the model captures features (EAGLE): [emitted, F] of the kept positions
    features: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class PendingStep:
    """A launched forward pass whose sampled tokens are still on their way to the host.

    `token_ids` [sampled chunks] stays on the device, where the next decode step can read it
    as its input ids before anyone has looked at it (the overlap schedule)."""

    batch: ScheduledBatch
    token_ids: torch.Tensor | None  # [S] int64, device; None when no chunk samples
    cuda_graph: bool
    padded_bs: int
    prompt_logprobs: tuple[tuple[int, tuple[TokenLogprob, ...]] | None, ...] = ()
    features: tuple[torch.Tensor, ...] = ()
    # Host copies of (token ids, chosen logprobs, top logprobs, top ids), queued at launch, and
    # the event after them: collecting waits for this step's work only, not for later launches.
    host: tuple[torch.Tensor | None, ...] = ()
    ready: torch.cuda.Event | None = None


class ModelRunner:
    """Contract: `forward` runs exactly one forward pass and returns after exactly one host sync
    (reading the sampled ids); decode batches replay a CUDA graph when `capture_cuda_graphs` has
    captured a bucket that holds them, and run eager otherwise. `launch` + `collect` split
    `forward` in two: `launch` queues the pass without waiting for the device, `collect` waits
    for that pass alone, so a later pass may be launched in between."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVPool,
        attention: AttentionBackend,
        device: torch.device,
        max_running_requests: int = 64,
        max_request_tokens: int | None = None,
        scratch_rows: int = 0,
    ) -> None:
        """`scratch_rows`: slot-table rows for draft-tree nodes (SlotTable.scratch)."""
        self.model = model
        self.pool = pool
        self.attention = attention
        self.device = device
        self.vocab_size = model.config.vocab_size
        width = max_request_tokens or pool.spec.num_slots
        self.slots = SlotTable(max_running_requests, width, device, scratch_rows)
        self.graphs: DecodeGraphRunner | None = None

    def cuda_graph_unsupported(self) -> str | None:
        """Why decode cannot run from CUDA graphs here, or None when it can."""
        if self.device.type != "cuda":
            return f"CUDA graphs need a CUDA device (this engine runs on {self.device.type})"
        if not self.attention.supports_cuda_graph:
            return f"the {type(self.attention).__name__} backend is not CUDA-graph safe"
        return None

    def capture_cuda_graphs(
        self, max_bs: int, progress: Callable[[float], None] | None = None
    ) -> CaptureReport:
        """Capture decode graphs for every bucket up to `max_bs` (after the KV pool exists)."""
        reason = self.cuda_graph_unsupported()
        if reason is not None:
            raise ValueError(reason)
        graphs = DecodeGraphRunner(self.model, self.attention, self.slots, max_bs)
        report = graphs.capture(progress)
        self.graphs = graphs
        return report

    def adopt(self, requests: list[Request], lengths: list[int] | None = None) -> None:
        """Give running requests whose KV already sits in the pool (a rebuilt runner over the
        same pool) their slot-table rows: positions [0, num_computed) (or [0, lengths[i]))
        -> their slots."""
        page_size = self.pool.page_size
        rows: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for i, req in enumerate(requests):
            n = req.num_computed if lengths is None else lengths[i]
            row = self.slots.row(req)
            rows.extend([row] * n)
            positions.extend(range(n))
            slots.extend(slots_for_positions(req.pages, 0, n, page_size))
        if rows:
            packed = int64_to_device(rows + positions + slots, self.device)
            self.slots.write(*packed.split(len(rows)))

    def drop_cuda_graphs(self) -> None:
        """Free the captured graphs and their memory pool (before a re-capture)."""
        self.graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self) -> None:
        """Drop the graphs (their memory pool), the slot table and the attention backend's own
        memory, at shutdown or rebuild."""
        self.drop_cuda_graphs()
        self.slots.release()
        self.attention.release()

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, use_cuda_graph: bool = True) -> StepOutput:
        """One step; `use_cuda_graph=False` forces eager decode (benchmarks compare the two)."""
        return self.collect(self.launch(batch, use_cuda_graph))

    @torch.inference_mode()
    def launch(
        self,
        batch: ScheduledBatch,
        use_cuda_graph: bool = True,
        after: PendingStep | None = None,
    ) -> PendingStep:
        """Queue one step. `after`: the decode step still in flight that samples the input
        token of each of `batch`'s chunks scheduled `ahead` (Scheduler.schedule_ahead); their
        input ids are read from its device tensor, never from the host."""
        input_ids = None if after is None else _ahead_inputs(batch, after)
        graphs = self.graphs if use_cuda_graph and batch.kind == "decode" else None
        if graphs is not None and graphs.padded_size(batch.batch_size) is not None:
            return self._decode_graph(batch, graphs, input_ids)
        return self._eager(batch, input_ids)

    def collect(self, pending: PendingStep) -> StepOutput:
        """Wait for `pending` (only) and hand its sampled tokens to the host."""
        batch = pending.batch
        tokens: list[int | None] = [None] * len(batch.chunks)
        logprobs: list[TokenLogprob | None] = [None] * len(batch.chunks)
        if pending.token_ids is not None:
            if pending.ready is not None:
                pending.ready.synchronize()
            ids_h, lp_h, top_lp_h, top_ids_h = pending.host
            assert ids_h is not None
            ids = ids_h.tolist()
            reqs = [c.req for c in batch.chunks if c.samples]
            lps = _logprobs_to_host(ids, lp_h, top_lp_h, top_ids_h, reqs)
            row = 0
            for i, chunk in enumerate(batch.chunks):
                if chunk.samples:
                    tokens[i] = ids[row]
                    logprobs[i] = lps[row]
                    row += 1
        return StepOutput(
            tuple(tokens),
            tuple(logprobs),
            pending.cuda_graph,
            pending.padded_bs,
            pending.prompt_logprobs,
            pending.features,
        )

    def features_buffer(self, num_tokens: int) -> torch.Tensor | None:
        """[T, F] for the target's features, when an EAGLE head drafts from them."""
        if not self.model.feature_layers:
            return None
        return torch.empty(
            num_tokens, self.model.feature_size, dtype=self.model.lm_head_weight.dtype,
            device=self.device,
        )  # fmt: skip

    @torch.inference_mode()
    def run_tokens(
        self, items: list[tuple[Request, list[int], int]], gather: list[int], **model_inputs: Any
    ) -> Any:  # the model's output: [len(gather), V] fp32 logits for a target model
        """Eager forward of arbitrary tokens: item (req, tokens, start) puts `tokens` at
        positions start.. of `req` (its pages must cover them) after its KV [0, start). `gather`
        picks logit rows by index into each item's tokens, item after item: entry i belongs to
        the item whose share of `gather` it falls in (len(gather) / len(items) per item). Used
        by eager verify passes and by draft models, whose tokens are not the request's yet;
        `model_inputs` go to the model as they are (per-token tensors in item order)."""
        page_size = self.pool.page_size
        ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []
        token_rows: list[int] = []
        rows: list[int] = []
        firsts: list[int] = []
        for req, tokens, start in items:
            n = len(tokens)
            firsts.append(len(ids))
            row = self.slots.row(req)
            rows.append(row)
            token_rows.extend([row] * n)
            ids.extend(tokens)
            positions.extend(range(start, start + n))
            write_slots.extend(slots_for_positions(req.pages, start, start + n, page_size))
        per_item = len(gather) // len(items)
        flat = [firsts[i // per_item] + g for i, g in enumerate(gather)]
        num_tokens = len(ids)
        packed = int64_to_device(
            ids + positions + write_slots + token_rows + rows + flat, self.device
        )
        sizes = [num_tokens] * 4 + [len(rows), len(flat)]
        ids_d, pos_d, write_d, token_rows_d, rows_d, gather_d = packed.split(sizes)
        self.slots.write(token_rows_d, pos_d, write_d)
        inputs = AttentionInputs(
            prefix_lens=torch.tensor([start for _, _, start in items], dtype=torch.int64),
            extend_lens=torch.tensor([len(t) for _, t, _ in items], dtype=torch.int64),
            kv_slots=self.slots.table[:, : max(s + len(t) for _, t, s in items)].index_select(
                0, rows_d
            ),
            write_slots=write_d,
            is_decode=all(len(t) == 1 for _, t, _ in items),
        )
        self.attention.plan(inputs)
        return self.model(ids_d, pos_d, self.attention, gather_d, **model_inputs)

    @torch.inference_mode()
    def run_rows(
        self,
        ids: list[int],
        positions: list[int],
        write_slots: list[int],
        rows: list[int],
        **model_inputs: Any,
    ) -> Any:  # the model's output, one row per token
        """Eager forward of tokens that each read their own slot-table row: token t sits at
        positions[t], writes its K/V to write_slots[t] and attends to rows[t]'s slots
        [0, positions[t]] (the row must hold everything before it). Draft-tree nodes run this
        way, each on a scratch row holding its request's prefix and its ancestors."""
        n = len(ids)
        packed = int64_to_device(ids + positions + write_slots + rows, self.device)
        ids_d, pos_d, write_d, rows_d = packed.split(n)
        self.slots.write(rows_d, pos_d, write_d)
        inputs = AttentionInputs(
            prefix_lens=torch.tensor(positions, dtype=torch.int64),
            extend_lens=torch.ones(n, dtype=torch.int64),
            kv_slots=self.slots.table[:, : max(positions) + 1].index_select(0, rows_d),
            write_slots=write_d,
            is_decode=True,
        )
        self.attention.plan(inputs)
        gather = torch.arange(n, device=self.device)
        return self.model(ids_d, pos_d, self.attention, gather, **model_inputs)

    def _decode_graph(
        self,
        batch: ScheduledBatch,
        graphs: DecodeGraphRunner,
        device_ids: torch.Tensor | None = None,  # [B]: input ids already on the device
    ) -> PendingStep:
        page_size = self.pool.page_size
        input_ids, positions, write_slots, rows = [], [], [], []
        for chunk in batch.chunks:
            req = chunk.req
            pos = chunk.start  # decode: exactly one new token, the last one
            input_ids.append(0 if chunk.ahead else req.token_ids(pos, pos + 1)[0])
            positions.append(pos)
            write_slots.append(slots_for_positions(req.pages, pos, pos + 1, page_size)[0])
            rows.append(self.slots.row(req))
        logits, padded = graphs.replay(input_ids, positions, write_slots, rows, device_ids)
        return self._sample(batch, logits, True, padded)

    def _eager(self, batch: ScheduledBatch, device_ids: torch.Tensor | None = None) -> PendingStep:
        page_size = self.pool.page_size
        input_ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []
        token_rows: list[int] = []  # slot-table row of every new token
        rows: list[int] = []
        logit_rows: list[int] = []
        sample_rows: list[int] = []  # index into logit_rows
        prompt_rows: list[tuple[int, int, int] | None] = []  # (first logit row, first pos, n)
        # slot-table entries (row, position, slot) of prefixes found in the prefix cache
        cached: tuple[list[int], list[int], list[int]] = ([], [], [])
        for chunk in batch.chunks:
            req = chunk.req
            first_row = len(input_ids)
            row = self.slots.row(req)
            rows.append(row)
            if chunk.cached:
                cached[0].extend([row] * chunk.cached)
                cached[1].extend(range(chunk.cached))
                cached[2].extend(slots_for_positions(req.pages, 0, chunk.cached, page_size))
            token_rows.extend([row] * chunk.length)
            input_ids.extend([0] if chunk.ahead else req.token_ids(chunk.start, chunk.end))
            positions.extend(range(chunk.start, chunk.end))
            write_slots.extend(slots_for_positions(req.pages, chunk.start, chunk.end, page_size))
            # Logits at position p score prompt token p + 1.
            scored = min(chunk.end, req.num_prompt_tokens - 1) - chunk.start
            if req.params.prompt_logprobs is not None and scored > 0:
                prompt_rows.append((len(logit_rows), chunk.start + 1, scored))
                logit_rows.extend(range(first_row, first_row + scored))
            else:
                prompt_rows.append(None)
            if chunk.samples:
                sample_rows.append(len(logit_rows))
                logit_rows.append(len(input_ids) - 1)
        num_tokens = len(input_ids)
        # Every index the step needs, in one queued host->device copy.
        packed = int64_to_device(
            input_ids + positions + write_slots + token_rows + rows + logit_rows + sample_rows,
            self.device,
        )
        sizes = [num_tokens] * 4 + [len(rows), len(logit_rows), len(sample_rows)]
        ids_d, pos_d, write_d, token_rows_d, rows_d, logit_rows_d, sample_rows_d = packed.split(
            sizes
        )
        if device_ids is not None:  # a decode step scheduled ahead: one input id per chunk
            ids_d = device_ids
        if cached[0]:  # one more queued copy, before the step's own tokens' slots
            entries = int64_to_device([*cached[0], *cached[1], *cached[2]], self.device)
            self.slots.write(*entries.view(3, -1))
        self.slots.write(token_rows_d, pos_d, write_d)
        max_kv = max(c.end for c in batch.chunks)
        kv_slots = self.slots.table[:, :max_kv].index_select(0, rows_d)  # [B, max_kv]
        inputs = AttentionInputs(
            prefix_lens=torch.tensor([c.start for c in batch.chunks], dtype=torch.int64),
            extend_lens=torch.tensor([c.length for c in batch.chunks], dtype=torch.int64),
            kv_slots=kv_slots,
            write_slots=write_d,
            is_decode=batch.kind == "decode",
            rows=tuple(rows),
        )
        self.attention.plan(inputs)
        features = self.features_buffer(num_tokens)
        logits = self.model(ids_d, pos_d, self.attention, logit_rows_d, features=features)
        prompt_lps = self._prompt_logprobs(batch, logits, prompt_rows)  # logits: [S, V]
        if len(sample_rows) != len(logit_rows):
            logits = logits[sample_rows_d]
        per_chunk: tuple[torch.Tensor, ...] = ()
        if features is not None:
            ends = itertools.accumulate(c.length for c in batch.chunks)
            pairs = zip(batch.chunks, ends, strict=True)
            per_chunk = tuple(features[end - c.length : end] for c, end in pairs)
        return self._sample(batch, logits, False, len(batch.chunks), tuple(prompt_lps), per_chunk)

    def _sample(
        self,
        batch: ScheduledBatch,
        logits: torch.Tensor,  # [sampled chunks, V]
        cuda_graph: bool,
        padded_bs: int,
        prompt_logprobs: tuple[tuple[int, tuple[TokenLogprob, ...]] | None, ...] = (),
        features: tuple[torch.Tensor, ...] = (),
    ) -> PendingStep:
        """Queue the sampling kernels and the copies of their results to the host."""
        reqs = [c.req for c in batch.chunks if c.samples]
        if not reqs:
            return PendingStep(batch, None, cuda_graph, padded_bs, prompt_logprobs, features)
        sampling = SamplingBatch.build(
            [r.params for r in reqs],
            [r.prompt_ids for r in reqs],
            [r.output_ids for r in reqs],
            [r.generator for r in reqs],
            self.vocab_size,
            self.device,
        )
        out = sample(logits, sampling)
        host = tuple(
            _to_host_queued(t)
            for t in (out.token_ids, out.logprobs, out.top_logprobs, out.top_token_ids)
        )
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return PendingStep(
            batch, out.token_ids, cuda_graph, padded_bs, prompt_logprobs, features, host, ready
        )

    def _prompt_logprobs(
        self,
        batch: ScheduledBatch,
        logits: torch.Tensor,  # [S, V]
        prompt_rows: list[tuple[int, int, int] | None],
    ) -> list[tuple[int, tuple[TokenLogprob, ...]] | None]:
        result: list[tuple[int, tuple[TokenLogprob, ...]] | None] = []
        for chunk, rows in zip(batch.chunks, prompt_rows, strict=True):
            if rows is None:
                result.append(None)
                continue
            row0, first_pos, n = rows
            req = chunk.req
            top_n = req.params.prompt_logprobs or 0
            lp = logits[row0 : row0 + n].log_softmax(-1)  # [n, V]
            target_ids = req.prompt_ids[first_pos : first_pos + n]
            targets = torch.tensor(target_ids, device=lp.device)
            chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
            top_lp, top_ids = lp.topk(top_n, dim=-1)
            top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
            entries = tuple(
                TokenLogprob(
                    target_ids[i], chosen[i], tuple(zip(top_ids[i], top_lp[i], strict=True))
                )
                for i in range(n)
            )
            result.append((first_pos, entries))
        return result


def _ahead_inputs(batch: ScheduledBatch, after: PendingStep) -> torch.Tensor:
    """[B] device input ids of `batch`, whose chunks continue requests of `after` (a decode
    step, one sampled token per chunk): the tokens `after` samples for them."""
    assert after.token_ids is not None and all(c.ahead for c in batch.chunks)
    row_of = {id(c.req): i for i, c in enumerate(after.batch.chunks)}
    rows = [row_of[id(c.req)] for c in batch.chunks]
    if rows == list(range(len(after.batch.chunks))):
        return after.token_ids
    index = int64_to_device(rows, after.token_ids.device)
    return after.token_ids.index_select(0, index)


def _to_host_queued(t: torch.Tensor | None) -> torch.Tensor | None:
    """A host copy of device tensor `t`, queued on the stream (pinned memory): valid once the
    step's `ready` event has passed. On the host already: `t` itself."""
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _logprobs_to_host(
    ids: list[int],
    chosen_t: torch.Tensor | None,
    top_lp_t: torch.Tensor | None,
    top_ids_t: torch.Tensor | None,
    reqs: list[Request],
) -> list[TokenLogprob | None]:
    if chosen_t is None or top_lp_t is None or top_ids_t is None:
        return [None] * len(reqs)
    chosen = chosen_t.tolist()
    top_lp = top_lp_t.tolist()
    top_ids = top_ids_t.tolist()
    result: list[TokenLogprob | None] = []
    for i, req in enumerate(reqs):
        n = req.params.logprobs
        if n is None:
            result.append(None)
            continue
        top = tuple(zip(top_ids[i][:n], top_lp[i][:n], strict=True))
        result.append(TokenLogprob(ids[i], chosen[i], top))
    return result
