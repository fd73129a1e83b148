"""The engine thread's bookkeeping after each forward pass: sampled and accepted tokens into
their requests (stop checks, streaming deltas), finished requests out (pages back, a
RequestRecord, the final delta), and the step's StepRecord. A mixin of Engine, which owns the
state it reads; no method here runs a model."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from .kv_cache import KVPool, PageAllocator
from .model_loader import LoadedModel
from .outputs import Delta, RequestHandle, Usage
from .read_bytes import StepReads, kv_bytes_per_position
from .request import FinishReason, Request
from .runner import StepOutput, VerifyOutput
from .scheduler import ScheduledBatch, Scheduler
from .spec.speculator import Proposal
from .telemetry import RequestRecord, StepRecord, TelemetryBuffer


class StepResultsMixin:
    loaded: LoadedModel
    scheduler: Scheduler
    allocator: PageAllocator
    telemetry: TelemetryBuffer
    counters: dict[str, int]
    fault_hook: Callable[[Request], None] | None
    _handles: dict[str, RequestHandle]
    _requests: dict[str, Request]
    _step_ids: itertools.count
    pool: KVPool
    _reads: StepReads | None = None
    _reads_pool: KVPool | None = None  # the pool `_reads` was made for

    def _process(self, batch: ScheduledBatch, out: StepOutput) -> int:
        now = time.time()
        generated = 0
        prompt_lps = out.prompt_logprobs or (None,) * len(batch.chunks)
        for chunk, token, logprob, prompt_lp in zip(
            batch.chunks, out.tokens, out.logprobs, prompt_lps, strict=True
        ):
            req = chunk.req
            if req.finished:  # stopped a step ago; this row ran ahead of that (overlap)
                continue
            req.num_computed = chunk.end
            if prompt_lp is not None:
                first_pos, entries = prompt_lp
                # Only positions not yet scored (a retracted request is re-prefilled).
                skip = len(req.prompt_logprobs) - (first_pos - 1)
                if skip >= 0:
                    req.prompt_logprobs.extend(entries[skip:])
            if token is None:
                continue
            generated += 1
            try:
                if self.fault_hook is not None:
                    self.fault_hook(req)
                self._append_token(req, token, logprob, now)
            except Exception as exc:  # a failure in one request finishes only that request
                self._finish(req, FinishReason.ERROR, f"internal error: {exc!r}")
        return generated

    def _process_verify(self, batch: ScheduledBatch, out: VerifyOutput) -> int:
        now = time.time()
        generated = 0
        for chunk, tokens, accepted, logprobs in zip(
            batch.chunks, out.tokens, out.accepted, out.logprobs, strict=True
        ):
            req = chunk.req
            req.num_computed = chunk.start + 1 + accepted  # the rejected drafts' KV is dropped
            req.draft_computed = min(req.draft_computed, req.num_computed)
            req.accepted_draft_tokens += accepted
            for token, logprob in zip(tokens, logprobs, strict=True):
                generated += 1
                try:
                    if self.fault_hook is not None:
                        self.fault_hook(req)
                    self._append_token(req, token, logprob, now)
                except Exception as exc:
                    self._finish(req, FinishReason.ERROR, f"internal error: {exc!r}")
                if req.finished:
                    break
            if not req.finished:
                self.scheduler.trim(req)
        return generated

    def _append_token(self, req: Request, token: int, logprob: Any, now: float) -> None:
        if req.first_token_time is None:
            req.first_token_time = now
        req.output_ids.append(token)
        params = req.params
        may_stop = len(req.output_ids) >= params.min_tokens
        is_stop_id = token in params.stop_token_ids or (
            not params.ignore_eos and token in self.loaded.eos_token_ids
        )
        text = ""
        if req.detokenizer is not None and not (is_stop_id and may_stop):
            text = req.detokenizer.add(token)
        handle = self._handles[req.rid]
        reason: FinishReason | None = None
        if may_stop and (is_stop_id or (req.detokenizer and req.detokenizer.stopped_on)):
            reason = FinishReason.STOP
        elif len(req.output_ids) >= req.max_new_tokens:
            reason = FinishReason.LENGTH
        logprobs = (logprob,) if logprob else ()
        prompt_lps = None
        if len(req.output_ids) == 1 and params.prompt_logprobs is not None:
            prompt_lps = tuple(req.prompt_logprobs)
        if reason is None:
            handle.put(Delta(req.rid, text, (token,), logprobs, prompt_logprobs=prompt_lps))
            return
        if reason is FinishReason.LENGTH and req.detokenizer is not None:
            text += req.detokenizer.flush()
        self._finish(req, reason, None, text, (token,), logprobs, prompt_lps)

    def _finish(
        self,
        req: Request,
        reason: FinishReason,
        error: str | None,
        text: str = "",
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[Any, ...] = (),
        prompt_logprobs: tuple[Any, ...] | None = None,
    ) -> None:
        # A request that failed may hold KV of a step that broke off: it is not cached.
        self.scheduler.finish(req, cache=reason is not FinishReason.ERROR)
        self._requests.pop(req.rid, None)
        req.finish_reason = reason
        req.error = error
        req.finish_time = time.time()
        usage = Usage(req.num_prompt_tokens, len(req.output_ids), req.num_cached_tokens)
        self.telemetry.append(
            RequestRecord(
                rid=req.rid,
                arrival=req.arrival_time,
                first_token=req.first_token_time,
                finish=req.finish_time,
                prompt_tokens=req.num_prompt_tokens,
                cached_tokens=req.num_cached_tokens,
                completion_tokens=len(req.output_ids),
                accepted_draft_tokens=req.accepted_draft_tokens,
                finish_reason=reason.value,
                retractions=req.num_retractions,
                error=error or "",
            )
        )
        self.counters["finished_requests"] += 1
        handle = self._handles.pop(req.rid, None)
        if handle is not None:
            handle.put(
                Delta(
                    req.rid,
                    text,
                    token_ids,
                    logprobs,
                    True,
                    reason.value,
                    error,
                    usage,
                    prompt_logprobs,
                )
            )

    def _record_step(
        self,
        batch: ScheduledBatch,
        out: StepOutput | VerifyOutput,
        generated: int,
        duration: float,
        proposal: Proposal | None = None,
        accepted: tuple[int, ...] = (),
    ) -> None:
        self.counters["steps"] += 1
        self.counters["generated_tokens"] += generated
        per_position: tuple[int, ...] = ()
        drafted = 0
        if proposal is not None:
            drafted = sum(map(len, proposal.drafts))
            per_position = tuple(sum(a > k for a in accepted) for k in range(proposal.depth))
        cached, admitted = admission_tokens(batch)
        self.telemetry.append(
            StepRecord(
                step_id=next(self._step_ids),
                time=time.time(),
                kind="verify" if proposal is not None else batch.kind,
                batch_size=batch.batch_size,
                num_tokens=batch.num_tokens + drafted,
                num_generated=generated,
                cuda_graph=out.cuda_graph,
                padded_bs=out.padded_bs,
                duration_s=duration,
                queue_len=len(self.scheduler.waiting),
                running=len(self.scheduler.running),
                kv_pages_used=self.scheduler.pages_in_use,
                kv_pages_total=self.allocator.num_usable,
                drafted_tokens=drafted,
                accepted_tokens=sum(accepted),
                retracted=len(batch.retracted),
                accepted_per_position=per_position,
                kv_pages_cached=self.scheduler.pages_reclaimable,
                cached_tokens=cached,
                admitted_tokens=admitted,
                bytes_read=self._step_reads().of_batch(batch, drafted),
            )
        )

    def _step_reads(self) -> StepReads:
        """The byte model of the model and pool in use (a hot restart may replace either)."""
        reads, model, pool = self._reads, self.loaded.model, self.pool
        if reads is None or reads.model is not model or self._reads_pool is not pool:
            reads = self._reads = StepReads(model, kv_bytes_per_position(pool.spec))
            self._reads_pool = pool
        return reads


def admission_tokens(batch: ScheduledBatch) -> tuple[int, int]:
    """(tokens read from the prefix cache, all tokens at admission) of the requests `batch`
    admits: the prefix-cache hit rate's numerator and denominator.

    An admission chunk starts where its request's cached prefix ends (at 0 on a miss); a later
    chunk starts past tokens the request computed, never at its `cached` (0 there)."""
    if batch.kind != "prefill":
        return 0, 0
    cached = admitted = 0
    for chunk in batch.chunks:
        if chunk.start != chunk.cached:
            continue
        cached += chunk.cached
        # The request's length at admission: a chunk that samples ran to it (the request has
        # one token more now); one that does not (chunked prefill) left the request as it was.
        admitted += chunk.end if chunk.samples else chunk.req.num_tokens
    return cached, admitted
