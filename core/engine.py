"""Engine: the public entry point. Loads the model, then runs the step loop on its own thread.

Other threads talk to the loop only through `_inbox` (typed commands) and read results from
per-request handles and the telemetry buffer; no lock is held across a forward pass.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .attention import make_backend, require_cuda
from .bandwidth import copy_rate
from .config import EngineConfig
from .cpu_threads import release_omp_workers
from .detokenizer import IncrementalDetokenizer
from .hot_restart import HotRestartMixin, PendingGap, RestartCommand
from .hot_restart import RestartError as RestartError  # re-exported: callers catch it here
from .hot_restart import RestartResult as RestartResult
from .kv_cache import KVPool, PageAllocator
from .model_loader import LoadedModel, Progress, gpu_memory_gb, load_model, pick_device
from .outputs import Delta, GenerationResult, RequestHandle
from .pool_sizing import kv_pool_spec
from .prefix_cache import PrefixCache
from .request import FinishReason, Request, RequestState
from .restart import RestartPlan, plan_restart
from .runner import ModelRunner, PendingStep, StepOutput, VerifyOutput
from .sampling_params import SamplingParams
from .scheduler import DraftKV, ScheduledBatch, Scheduler
from .spec.speculator import (
    DraftCache,
    Speculator,
    build_speculator,
    check_speculative,
    draft_bytes_per_page,
    load_draft,
    tree_scratch_rows,
)
from .step_results import StepResultsMixin
from .telemetry import (
    EngineEvent,
    LiveRequest,
    Subscription,
    TelemetryBuffer,
)


class RequestError(ValueError):
    """A request that cannot be served as asked (too long, empty, no tokenizer); nothing else is
    affected. `code` is OpenAI's error code where one applies."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class EngineStoppedError(RuntimeError):
    """The engine has shut down and takes no more requests."""


@dataclass(frozen=True)
class _Submit:
    req: Request
    handle: RequestHandle


@dataclass(frozen=True)
class _Abort:
    rid: str


@dataclass(frozen=True)
class _Shutdown:
    pass


@dataclass(frozen=True)
class _FlushCache:
    done: Future[int]


Prompt = str | Sequence[int]


@dataclass(frozen=True)
class RequestDetail:
    """A request's prompt and output so far, decoded on the caller's thread."""

    rid: str
    prompt: str
    output: str
    prompt_tokens: int
    generated_tokens: int
    max_new_tokens: int
    params: SamplingParams


class Engine(StepResultsMixin, HotRestartMixin):
    def __init__(self, config: EngineConfig | None = None, progress: Progress | None = None):
        config = config or EngineConfig()
        device = pick_device(config.device)
        self.config = config.resolve(device.type, gpu_memory_gb(device))
        check_buildable(self.config)
        # Before the weights and the KV pool take the memory: a copy beyond the caches.
        self.memory_copy_rate = copy_rate(device)
        self.spec: Speculator | None = None
        self._draft_cache: DraftCache | None = None
        self.telemetry = TelemetryBuffer(self.config.telemetry_capacity)
        self.loaded: LoadedModel = load_model(self.config, progress)
        self.tokenizer = self.loaded.tokenizer
        self.model_name = self.loaded.source.name
        if progress is not None:
            progress("allocating KV cache", 0.95)
        try:
            self._build_runtime()
            self._capture_cuda_graphs(progress)
        except BaseException:
            self._release_partial()  # a failed start keeps no GPU memory
            raise
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}
        # rid -> Request of every unfinished request; the engine thread writes it, other threads
        # only do single `get`s (atomic in CPython) to read a request's tokens.
        self._requests: dict[str, Request] = {}
        self._live: tuple[LiveRequest, ...] = ()
        self._live_wanted = False
        self._ids = itertools.count()
        self._step_ids = itertools.count()
        self._stopped = threading.Event()
        self.fault_hook: Any = None  # tests inject per-request faults through this
        self.state = "running"  # running | restarting | stopped
        self._restart_lock = threading.Lock()  # one restart at a time, planned on the latest config
        self._pending_gap: PendingGap | None = None
        self._last_token_at = time.perf_counter()
        self.counters = {
            "steps": 0,
            "generated_tokens": 0,
            "finished_requests": 0,
            "steps_launched_ahead": 0,  # overlap schedule: launched before the last step's tokens
        }
        # On the CPU the engine thread runs every product; OpenMP workers parked by any other
        # thread slow it down (see cpu_threads), so the caller gives back those of the build.
        self._on_cpu = self.loaded.device.type == "cpu"
        self._omp_workers_held = False  # the engine thread computed since it last went idle
        if self._on_cpu:
            release_omp_workers()
        self._thread = threading.Thread(target=self._loop, name="llmconsole-engine", daemon=True)
        self._thread.start()
        self._event(
            "start",
            f"engine ready: {self.model_name} on {self.config.device}",
            {
                "load_seconds": round(self.loaded.load_seconds, 3),
                "weights": self.loaded.weight_format,
                "prefix_cache": self.config.prefix_cache,
                "memory_copy_gb_per_s": round(self.memory_copy_rate / 1e9, 1),
            },
        )

    def _release_partial(self) -> None:
        """Free whatever a failed start built: draft weights, speculator, runner and pool (the
        pool's release gives the freed GPU memory back)."""
        self._draft_cache = None
        for part in ("spec", "runner", "pool"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.release()

    def _build_runtime(self) -> None:
        cfg, loaded = self.config, self.loaded
        self._draft_cache = load_draft(cfg, loaded, self._draft_cache)
        extra = draft_bytes_per_page(self._draft_cache, cfg.page_size)
        spec = kv_pool_spec(cfg, loaded, extra)
        self.pool = KVPool(spec, loaded.device)
        self.allocator = PageAllocator(spec.num_pages)
        cache = PrefixCache(self.allocator, spec.page_size) if cfg.prefix_cache else None
        self.scheduler = Scheduler(
            self.allocator,
            spec.page_size,
            cfg.max_running_requests,
            cfg.chunked_prefill_size,
            cache,
        )
        self._build_runner()

    def _build_runner(self) -> None:
        """Attention backend, slot table and runner over the existing KV pool."""
        cfg, loaded = self.config, self.loaded
        attention = make_backend(cfg.attention_backend, self.pool)
        model_context = loaded.model_config.max_position_embeddings
        self.context_length = min(cfg.context_length or model_context, model_context)
        self.max_request_tokens = min(self.context_length, self.scheduler.capacity_tokens)
        self.runner = ModelRunner(
            loaded.model,
            self.pool,
            attention,
            loaded.device,
            cfg.max_running_requests,
            self.max_request_tokens,
            tree_scratch_rows(cfg),
        )
        self._build_speculator()

    def _build_speculator(self) -> None:
        """The proposer for the speculative flags, over the target's pages. A drafter's KV pool
        is new, so no request has draft KV any more, unless the same drafter (draft model or
        EAGLE head) drafts over the same target pool: its KV and the requests' waiting
        features then carry over."""
        draft_pool = None
        if self.spec is not None:
            draft_pool = self.spec.keepable_draft_pool(self.config, self.loaded, self.pool)
            self.spec.release(keep_draft_pool=draft_pool is not None)
        if draft_pool is None:
            for req in self.scheduler.requests():
                req.draft_computed = 0
                req.draft_features = None
        self._draft_cache = load_draft(self.config, self.loaded, self._draft_cache)
        self.spec = build_speculator(
            self.config,
            self.loaded,
            self.pool,
            self.max_request_tokens,
            self._draft_cache,
            draft_pool,
        )
        draft_kv = self.spec.draft_kv if self.spec is not None else DraftKV.NONE
        if draft_kv is not DraftKV.NONE and draft_pool is None and self.scheduler.pages_cached:
            # Cached prefixes hold no KV of this new drafter. A restart that keeps the target's
            # KV keeps the same drafter's pool (above), so this is a safety net. Prefixes that
            # running requests read stay: a request that matches one drafts worse there
            # (lower acceptance), never wrongly, since the target verifies every draft.
            self.scheduler.flush_cache()
        self.scheduler.draft_kv = draft_kv
        if draft_pool is not None and self.spec is not None:
            self.spec.adopt(self.scheduler.running)

    def _capture_cuda_graphs(self, progress: Progress | None) -> None:
        """Decode graphs for every bucket up to --cuda-graph-max-bs (times the verified tokens
        per request when speculating), once the KV pool exists."""
        cfg = self.config
        if self.loaded.device.type != "cuda":
            return
        reason = self.runner.cuda_graph_unsupported()
        if cfg.disable_cuda_graph or not cfg.cuda_graph_max_bs:
            reason = "--disable-cuda-graph"
        if reason is not None:
            self._event("cuda_graph", f"CUDA graphs off: {reason}; decode runs eager", {})
            return
        max_bs = min(cfg.cuda_graph_max_bs, cfg.max_running_requests)
        if self.spec is not None:
            self.spec.capture_cuda_graphs(max_bs)
        if cfg.speculative_algorithm != "none":
            # A verify pass replays decode graphs with one row per verified token.
            max_bs *= cfg.speculative_num_draft_tokens or 1
        report = self.runner.capture_cuda_graphs(
            max_bs,
            None if progress is None else lambda f: progress("capturing CUDA graphs", f),
        )
        sizes = report.batch_sizes
        self._event(
            "cuda_graph",
            f"captured {len(sizes)} decode CUDA graphs (batch {', '.join(map(str, sizes))}) "
            f"in {report.seconds:.1f} s",
            {
                "batch_sizes": list(sizes),
                "capture_seconds": round(report.seconds, 3),
                "memory_mib": round(report.memory_bytes / 2**20, 1),
            },
        )

    # ---- public API --------------------------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise RequestError(f"{self.model_name} has no tokenizer: pass token ids")
        return list(self.tokenizer(prompt).input_ids)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"{self.model_name} has no chat template")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        rid: str | None = None,
        sink: Callable[[Delta], None] | None = None,
    ) -> RequestHandle:
        """Queue one request; returns at once. Raises RequestError for a request that cannot run.

        With `sink`, deltas are handed to it on the engine thread (it must not block) instead of
        being queued for iteration."""
        if self._stopped.is_set():
            raise EngineStoppedError("the engine has shut down")
        params = params or SamplingParams()
        prompt_ids = self.tokenize(prompt)
        rid = rid or f"req-{next(self._ids)}"
        req = Request(rid, prompt_ids, params, self._max_new_tokens(prompt_ids, params))
        if self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(
                self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens
            )
        handle = RequestHandle(rid, len(prompt_ids), self.abort, sink)
        self._inbox.put(_Submit(req, handle))
        return handle

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        """Blocking: all prompts run concurrently; one that cannot run gets an error result."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        handles: list[RequestHandle | GenerationResult] = []
        for prompt in prompts:
            try:
                handles.append(self.submit(prompt, params))
            except RequestError as exc:
                handles.append(GenerationResult("", finish_reason="error", error=str(exc)))
        return [h if isinstance(h, GenerationResult) else h.result() for h in handles]

    def abort(self, rid: str) -> None:
        self._inbox.put(_Abort(rid))

    def flush_cache(self, timeout: float = 30.0) -> int:
        """Free every prefix-cache page that no running request reads (SGLang's /flush_cache);
        returns how many pages that freed. Benchmarks call it so that each run starts cold."""
        if self._stopped.is_set():
            raise EngineStoppedError("the engine has shut down")
        done: Future[int] = Future()
        self._inbox.put(_FlushCache(done))
        return done.result(timeout)

    def subscribe(self) -> Subscription:
        return self.telemetry.subscribe()

    def live_requests(self) -> tuple[LiveRequest, ...]:
        """Unfinished requests as of the last step (at most one step old once polled steadily):
        the engine rebuilds the snapshot after a step only when someone has asked since."""
        self._live_wanted = True
        return self._live

    def request_detail(self, rid: str) -> RequestDetail | None:
        """Prompt and text so far of an unfinished request; None once it has finished."""
        req = self._requests.get(rid)
        if req is None:
            return None
        prompt_ids, output_ids = list(req.prompt_ids), list(req.output_ids)
        decode = self.tokenizer.decode if self.tokenizer is not None else str
        return RequestDetail(
            rid,
            decode(prompt_ids),
            decode(output_ids) if output_ids else "",
            len(prompt_ids),
            len(output_ids),
            req.max_new_tokens,
            req.params,
        )

    def plan_restart(self, changes: Mapping[str, Any]) -> RestartPlan:
        """Validate new flags against the running config without applying them (forms use
        this to show what a restart would do). Raises ConfigError naming the flag."""
        plan = plan_restart(
            self.config,
            changes,
            self.loaded.device.type,
            gpu_memory_gb(self.loaded.device),
            self.runner.slots.num_rows - 1,
        )
        check_buildable(plan.new)
        return plan

    def restart(
        self,
        changes: Mapping[str, Any],
        progress: Progress | None = None,
        timeout: float | None = 600.0,
    ) -> RestartResult:
        """Apply new flags (EngineConfig field -> value; text is parsed) without losing a request.

        Validation happens here, before anything stops: an unknown field, a bad value or a
        fixed setting raises ConfigError and the engine runs on untouched. Otherwise the engine
        thread applies it between two steps (see restart.py for what each flag costs) and this
        returns once the requests that were running have emitted their next token. Requests
        keep streaming; ones submitted meanwhile wait in the queue. A rebuild that fails (e.g.
        the new KV budget cannot hold a request in flight) is rolled back and raises
        RestartError."""
        with self._restart_lock:
            if self._stopped.is_set():
                raise EngineStoppedError("the engine has shut down")
            plan = self.plan_restart(changes)
            done: Future = Future()
            self._inbox.put(RestartCommand(plan, progress, done))
            return done.result(timeout)

    def log_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Add an event from outside the engine (an export, a load run) to the session record."""
        self._event(kind, message, data)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish every pending request with reason "abort", stop the loop and join it."""
        if self._thread.is_alive():
            self._inbox.put(_Shutdown())
            self._thread.join(timeout)
        if not self._thread.is_alive():
            if self.spec is not None:
                self.spec.release()
            self.runner.release()  # graphs and slot table first: pool.release empties the cache
            self.pool.release()  # a stopped engine holds no KV memory (GPU memory goes back)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.scheduler.running),
            "queued": len(self.scheduler.waiting),
            "kv_pages_used": self.scheduler.pages_in_use,
            "kv_pages_total": self.allocator.num_usable,
            "kv_pages_cached": self.scheduler.pages_cached,
            "page_size": self.pool.page_size,
            "memory_copy_bytes_per_s": round(self.memory_copy_rate),
        }

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def describe(self) -> dict[str, Any]:
        """Config, state and counters, for /v1/engine and the console header."""
        config = self.config.to_dict()
        config["api_key"] = "***" if config.get("api_key") else None
        return {
            "model": self.model_name,
            "state": self.state if self.alive else "stopped",
            "device": str(self.loaded.device),
            "dtype": self.config.dtype,
            "context_length": self.context_length,
            "max_request_tokens": self.max_request_tokens,
            "config": config,
            "stats": self.stats(),
            "counters": dict(self.counters),
        }

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def _max_new_tokens(self, prompt_ids: list[int], params: SamplingParams) -> int:
        limit = self.max_request_tokens
        n = len(prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= limit:
            raise RequestError(
                f"the prompt has {n} tokens; this engine serves at most {limit - 1} prompt tokens "
                f"(context length {self.context_length}, KV pool {self.scheduler.capacity_tokens})",
                "context_length_exceeded",
            )
        if params.max_tokens is None:
            return limit - n
        if n + params.max_tokens > limit:
            raise RequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = "
                f"{n + params.max_tokens} exceeds the limit of {limit} tokens",
                "context_length_exceeded",
            )
        return params.max_tokens

    # ---- engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            idle = not self.scheduler.has_work()
            if idle and self._live:
                self._publish_live()  # nobody should see requests that have finished
            if idle and self._omp_workers_held:
                # Idle workers would slow other threads' torch ops (a transformers run beside
                # the engine); the next step starts new ones.
                release_omp_workers()
                self._omp_workers_held = False
            if not self._drain_inbox(block=idle):
                break
            batch = self.scheduler.schedule()
            if batch is None:
                continue
            if self.spec is not None and batch.kind == "prefill":
                self.spec.adopt_cached(batch)  # the drafter's KV in cached prefixes
            self._omp_workers_held = self._on_cpu
            if (
                batch.kind == "decode"
                and self.spec is None
                and self.config.overlap_schedule == "on"
            ):
                self._decode_overlapped(batch)
                continue
            started = time.perf_counter()
            spec = self.spec if batch.kind == "decode" else None
            try:
                if spec is not None:
                    proposal = spec.propose(batch, self.scheduler)
                    out: StepOutput | VerifyOutput = spec.verify(self.runner, batch, proposal)
                else:
                    out = self.runner.forward(batch)
            except Exception as exc:  # one bad batch must not stop the engine
                self._fail_batch(batch, exc)
                continue
            if out.features and self.spec is not None:
                self.spec.record(batch, out.features)  # what an EAGLE head drafts from next
            cached = self.scheduler.prefix_cache is not None
            if batch.kind == "prefill" and self.spec is not None and cached:
                self.spec.catch_up(batch)  # the draft model's KV of the prompt, to share
            if isinstance(out, VerifyOutput):
                generated = self._process_verify(batch, out)
                self._record_step(
                    batch,
                    out,
                    generated,
                    time.perf_counter() - started,
                    proposal,
                    out.accepted,
                )
            else:
                generated = self._process(batch, out)
                self._record_step(batch, out, generated, time.perf_counter() - started)
            self._after_step(generated)
        self._stopped.set()
        self.state = "stopped"
        self._complete_gap()
        for req in list(self.scheduler.requests()):
            self._finish(req, FinishReason.ABORT, "the engine shut down")
        while True:  # commands that raced with the shutdown get an answer too
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Submit):
                command.handle.put(
                    Delta(command.req.rid, "", (), (), True, "abort", "the engine shut down")
                )
            elif isinstance(command, RestartCommand | _FlushCache):
                command.done.set_exception(EngineStoppedError("the engine has shut down"))
        self._publish_live()
        self._event("shutdown", "engine stopped")

    def _decode_overlapped(self, batch: ScheduledBatch) -> None:
        """Decode steps back to back, each launched before the previous one's tokens are read
        (the overlap schedule): while the device runs step N + 1, the host turns step N's
        tokens into deltas, stop checks and telemetry, so the device never waits for Python.
        Returns, with nothing in flight, when the next step must be scheduled normally: a
        command arrived, requests wait, a prefill is due, pages ran short, or all finished."""
        started = time.perf_counter()
        try:
            pending: PendingStep | None = self.runner.launch(batch)
        except Exception as exc:
            self._fail_batch(batch, exc)
            return
        while pending is not None:
            ahead = None
            nxt = self.scheduler.schedule_ahead(pending.batch) if self._inbox.empty() else None
            if nxt is not None:
                try:
                    ahead = self.runner.launch(nxt, after=pending)
                    self.counters["steps_launched_ahead"] += 1
                except Exception as exc:
                    self._fail_batch(nxt, exc)
            try:
                out = self.runner.collect(pending)
            except Exception as exc:
                self._fail_batch(pending.batch, exc)
            else:
                generated = self._process(pending.batch, out)
                now = time.perf_counter()
                # Steps overlap: each one's duration runs from the previous one's tokens.
                self._record_step(pending.batch, out, generated, now - started)
                started = now
                self._after_step(generated)
            pending = ahead

    def _fail_batch(self, batch: ScheduledBatch, exc: Exception) -> None:
        """One bad batch must not stop the engine: its requests finish with the error."""
        self._event("error", f"forward pass failed: {exc!r}")
        for chunk in batch.chunks:
            if not chunk.req.finished:
                self._finish(chunk.req, FinishReason.ERROR, f"internal error: {exc!r}")

    def _after_step(self, generated: int) -> None:
        if generated:
            self._last_token_at = time.perf_counter()
            self._complete_gap()
        if self._live_wanted:
            self._publish_live()
        if not self.scheduler.has_work():
            self._complete_gap()  # the resumed requests finished (or were aborted)
            self._check_when_idle()

    def _publish_live(self) -> None:
        self._live_wanted = False
        self._live = tuple(
            LiveRequest(
                rid=req.rid,
                state="queued"
                if req.state is RequestState.WAITING
                else ("prefill" if req.in_prefill else "decode"),
                arrival=req.arrival_time,
                first_token=req.first_token_time,
                prompt_tokens=req.num_prompt_tokens,
                cached_tokens=req.num_cached_tokens,
                generated_tokens=len(req.output_ids),
                computed_tokens=req.num_computed,
                retractions=req.num_retractions,
                accepted_draft_tokens=req.accepted_draft_tokens,
            )
            for req in self.scheduler.requests()
        )

    def _check_when_idle(self) -> None:
        # A broken invariant is reported, never allowed to kill the engine thread.
        try:
            self.check_integrity()
        except AssertionError as exc:
            self._event("error", f"KV integrity check failed: {exc}")

    def _drain_inbox(self, block: bool) -> bool:
        """Apply every queued command; False once shutdown was asked for."""
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Shutdown):
                return False
            if isinstance(command, _Submit):
                self._handles[command.req.rid] = command.handle
                self._requests[command.req.rid] = command.req
                self.scheduler.add(command.req)
                misfit = self._misfit(command.req)  # limits may have shrunk since submit()
                if misfit is not None:
                    self._finish(command.req, FinishReason.ERROR, misfit)
            elif isinstance(command, _Abort):
                req = next((r for r in self.scheduler.requests() if r.rid == command.rid), None)
                if req is not None:
                    self._finish(req, FinishReason.ABORT, None)
            elif isinstance(command, RestartCommand):
                self._apply_restart(command)
            elif isinstance(command, _FlushCache):
                freed = self.scheduler.flush_cache()
                message = f"prefix cache flushed: {freed} pages freed"
                self._event("cache_flush", message, {"freed": freed})
                command.done.set_result(freed)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.telemetry.append(EngineEvent(time.time(), kind, message, data or {}))


def check_buildable(config: EngineConfig) -> None:
    """Flags this build accepts but cannot run fail loudly instead of being ignored."""
    check_speculative(config)
    require_cuda(config.attention_backend, config.device.split(":")[0])
