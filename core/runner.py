"""ModelRunner: turns a scheduled batch into tensors, runs the model once, samples.

It owns the model, the KV pool, the attention backend, the slot table and the decode CUDA graphs;
the scheduler owns which requests run. Host work per step is O(new tokens): the KV slots of
earlier tokens already sit in the device slot table. Decode batches replay a captured graph when
one holds them (`StepOutput.cuda_graph`, `padded_bs`); this is also the seam for speculative
verify passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention.base import AttentionBackend, AttentionInputs
from .cuda_graph import CaptureReport, DecodeGraphRunner
from .kv_cache import KVPool, slots_for_positions
from .models.llama import LlamaForCausalLM
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


class ModelRunner:
    """Contract: `forward` runs exactly one forward pass and returns after exactly one host sync
    (reading the sampled ids); decode batches replay a CUDA graph when `capture_cuda_graphs` has
    captured a bucket that holds them, and run eager otherwise."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVPool,
        attention: AttentionBackend,
        device: torch.device,
        max_running_requests: int = 64,
        max_request_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.attention = attention
        self.device = device
        self.vocab_size = model.config.vocab_size
        width = max_request_tokens or pool.spec.num_slots
        self.slots = SlotTable(max_running_requests, width, device)
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

    def release(self) -> None:
        """Drop the graphs (their memory pool) and the slot table, at shutdown."""
        self.graphs = None
        self.slots.release()

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, use_cuda_graph: bool = True) -> StepOutput:
        """One step; `use_cuda_graph=False` forces eager decode (benchmarks compare the two)."""
        graphs = self.graphs if use_cuda_graph and batch.kind == "decode" else None
        if graphs is not None and graphs.padded_size(batch.batch_size) is not None:
            return self._decode_graph(batch, graphs)
        return self._eager(batch)

    def _decode_graph(self, batch: ScheduledBatch, graphs: DecodeGraphRunner) -> StepOutput:
        page_size = self.pool.page_size
        input_ids, positions, write_slots, rows = [], [], [], []
        for chunk in batch.chunks:
            req = chunk.req
            pos = chunk.start  # decode: exactly one new token, the last one
            input_ids.append(req.token_ids(pos, pos + 1)[0])
            positions.append(pos)
            write_slots.append(slots_for_positions(req.pages, pos, pos + 1, page_size)[0])
            rows.append(self.slots.row(req))
        logits, padded = graphs.replay(input_ids, positions, write_slots, rows)  # [B, V]
        tokens, logprobs = self._sample(batch, logits)
        return StepOutput(tokens, logprobs, True, padded, ())

    def _eager(self, batch: ScheduledBatch) -> StepOutput:
        page_size = self.pool.page_size
        input_ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []
        token_rows: list[int] = []  # slot-table row of every new token
        rows: list[int] = []
        logit_rows: list[int] = []
        sample_rows: list[int] = []  # index into logit_rows
        prompt_rows: list[tuple[int, int, int] | None] = []  # (first logit row, first pos, n)
        for chunk in batch.chunks:
            req = chunk.req
            first_row = len(input_ids)
            row = self.slots.row(req)
            rows.append(row)
            token_rows.extend([row] * chunk.length)
            input_ids.extend(req.token_ids(chunk.start, chunk.end))
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
        self.slots.write(token_rows_d, pos_d, write_d)
        max_kv = max(c.end for c in batch.chunks)
        kv_slots = self.slots.table[:, :max_kv].index_select(0, rows_d)  # [B, max_kv]
        inputs = AttentionInputs(
            prefix_lens=torch.tensor([c.start for c in batch.chunks], dtype=torch.int64),
            extend_lens=torch.tensor([c.length for c in batch.chunks], dtype=torch.int64),
            kv_slots=kv_slots,
            write_slots=write_d,
            is_decode=batch.kind == "decode",
        )
        self.attention.plan(inputs)
        logits = self.model(ids_d, pos_d, self.attention, logit_rows_d)  # [S, V]
        prompt_lps = self._prompt_logprobs(batch, logits, prompt_rows)
        if len(sample_rows) != len(logit_rows):
            logits = logits[sample_rows_d]
        tokens, logprobs = self._sample(batch, logits)
        return StepOutput(tokens, logprobs, False, len(batch.chunks), tuple(prompt_lps))

    def _sample(
        self,
        batch: ScheduledBatch,
        logits: torch.Tensor,  # [sampled chunks, V]
    ) -> tuple[tuple[int | None, ...], tuple[TokenLogprob | None, ...]]:
        tokens: list[int | None] = [None] * len(batch.chunks)
        logprobs: list[TokenLogprob | None] = [None] * len(batch.chunks)
        sampled_chunks = [c for c in batch.chunks if c.samples]
        if not sampled_chunks:
            return tuple(tokens), tuple(logprobs)
        reqs = [c.req for c in sampled_chunks]
        sampling = SamplingBatch.build(
            [r.params for r in reqs],
            [r.prompt_ids for r in reqs],
            [r.output_ids for r in reqs],
            [r.generator for r in reqs],
            self.vocab_size,
            self.device,
        )
        out = sample(logits, sampling)
        ids = out.token_ids.tolist()  # the step's one host sync
        lp = _logprobs_to_host(out, reqs)
        row = 0
        for i, chunk in enumerate(batch.chunks):
            if chunk.samples:
                tokens[i] = ids[row]
                logprobs[i] = lp[row]
                row += 1
        return tuple(tokens), tuple(logprobs)

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


def _logprobs_to_host(out, reqs) -> list[TokenLogprob | None]:
    if out.logprobs is None:
        return [None] * len(reqs)
    chosen = out.logprobs.tolist()
    top_lp = out.top_logprobs.tolist()
    top_ids = out.top_token_ids.tolist()
    ids = out.token_ids.tolist()
    result: list[TokenLogprob | None] = []
    for i, req in enumerate(reqs):
        n = req.params.logprobs
        if n is None:
            result.append(None)
            continue
        top = tuple(zip(top_ids[i][:n], top_lp[i][:n], strict=True))
        result.append(TokenLogprob(ids[i], chosen[i], top))
    return result
