"""ModelRunner: turns a scheduled batch into tensors, runs the model once, samples.

It owns the model, the KV pool and the attention backend; the scheduler owns which requests run.
This is the seam for CUDA graphs (decode batches replayed from captured graphs, reported in
`StepOutput.cuda_graph` / `padded_bs`) and for speculative verify passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention.base import AttentionBackend, AttentionInputs
from .kv_cache import KVPool, slots_for_positions
from .models.llama import LlamaForCausalLM
from .sampling import SamplingBatch, sample
from .scheduler import ScheduledBatch


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
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVPool,
        attention: AttentionBackend,
        device: torch.device,
    ) -> None:
        self.model = model
        self.pool = pool
        self.attention = attention
        self.device = device
        self.vocab_size = model.config.vocab_size

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> StepOutput:
        page_size = self.pool.page_size
        input_ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []
        kv_rows: list[list[int]] = []
        logit_rows: list[int] = []
        sample_rows: list[int] = []  # index into logit_rows
        prompt_rows: list[tuple[int, int, int] | None] = []  # (first logit row, first pos, n)
        for chunk in batch.chunks:
            req = chunk.req
            first_row = len(input_ids)
            input_ids.extend(req.token_ids(chunk.start, chunk.end))
            positions.extend(range(chunk.start, chunk.end))
            kv_rows.append(slots_for_positions(req.pages, 0, chunk.end, page_size))
            write_slots.extend(kv_rows[-1][chunk.start :])
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
        max_kv = max(len(r) for r in kv_rows)
        kv_slots = torch.zeros(len(kv_rows), max_kv, dtype=torch.int64)
        for i, row in enumerate(kv_rows):
            kv_slots[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        inputs = AttentionInputs(
            prefix_lens=torch.tensor([c.start for c in batch.chunks], dtype=torch.int64),
            extend_lens=torch.tensor([c.length for c in batch.chunks], dtype=torch.int64),
            kv_slots=kv_slots,
            write_slots=torch.tensor(write_slots, dtype=torch.int64),
            is_decode=batch.kind == "decode",
        )
        self.attention.plan(inputs)
        dev = self.device
        logits = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.attention,
            torch.tensor(logit_rows, dtype=torch.int64, device=dev),
        )  # [S, V]
        prompt_lps = self._prompt_logprobs(batch, logits, prompt_rows)
        if len(sample_rows) != len(logit_rows):
            logits = logits[torch.tensor(sample_rows, device=dev)]
        sampled_chunks = [c for c in batch.chunks if c.samples]
        tokens: list[int | None] = [None] * len(batch.chunks)
        logprobs: list[TokenLogprob | None] = [None] * len(batch.chunks)
        if sampled_chunks:
            reqs = [c.req for c in sampled_chunks]
            sampling = SamplingBatch.build(
                [r.params for r in reqs],
                [r.prompt_ids for r in reqs],
                [r.output_ids for r in reqs],
                [r.generator for r in reqs],
                self.vocab_size,
                dev,
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
        return StepOutput(tuple(tokens), tuple(logprobs), False, len(tokens), tuple(prompt_lps))

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
