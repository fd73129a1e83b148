"""Hot restart on the engine thread: apply a validated `RestartPlan` between two steps at the
cheapest level that covers it (see restart.py), roll back on any failure, and report the gap.

A mixin of `Engine`, kept apart because it is its own concept: what a restart tears down, what it
keeps, and how requests in flight survive it. It uses the engine's runtime (`config`, `loaded`,
`pool`, `scheduler`, `runner`, `spec`) and its builders (`_build_runtime`, `_build_runner`,
`_capture_cuda_graphs`), and emits through `_event`.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .config import ConfigError, EngineConfig
from .model_loader import LoadedModel, Progress, load_model
from .request import Request
from .restart import RestartPlan

if TYPE_CHECKING:
    from .kv_cache import KVPool
    from .runner import ModelRunner
    from .scheduler import Scheduler
    from .spec.speculator import Speculator


class RestartError(RuntimeError):
    """A restart that could not be applied; the engine runs on, unchanged, on its old config."""


@dataclass(frozen=True)
class RestartResult:
    """What a hot restart did. `gap_s` is the time no token was emitted: from the last token
    before the restart to the first one after it (the rebuild alone when nothing was running)."""

    mode: str  # none | live | graphs | rebuild | reload (see restart.py)
    changes: dict[str, tuple[Any, Any]]
    config: EngineConfig
    rebuild_s: float
    gap_s: float
    resumed_requests: int  # running when the restart began, carried over
    kv_kept: bool  # True when those requests kept their KV (no re-prefill)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "changes": {k: [old, new] for k, (old, new) in self.changes.items()},
            "rebuild_s": round(self.rebuild_s, 4),
            "gap_s": round(self.gap_s, 4),
            "resumed_requests": self.resumed_requests,
            "kv_kept": self.kv_kept,
        }


@dataclass(frozen=True)
class RestartCommand:
    plan: RestartPlan
    progress: Progress | None
    done: Future


@dataclass
class PendingGap:
    """A restart that resumed running requests: it completes at their first token."""

    command: RestartCommand
    result: RestartResult
    since: float  # perf_counter of the last token before the restart


class HotRestartMixin:
    config: EngineConfig
    loaded: LoadedModel
    pool: KVPool
    scheduler: Scheduler
    runner: ModelRunner
    spec: Speculator | None
    tokenizer: Any
    model_name: str
    state: str
    max_request_tokens: int
    context_length: int
    _pending_gap: PendingGap | None
    _last_token_at: float

    if TYPE_CHECKING:

        def _build_runtime(self) -> None: ...
        def _build_runner(self) -> None: ...
        def _capture_cuda_graphs(self, progress: Progress | None) -> None: ...
        def _event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None: ...

    def _apply_restart(self, command: RestartCommand) -> None:
        self._complete_gap()  # a previous restart's gap ends here at the latest
        plan = command.plan
        if plan.mode == "none":
            command.done.set_result(RestartResult("none", {}, self.config, 0.0, 0.0, 0, True))
            return
        changes = {k: [old, new] for k, (old, new) in plan.changes.items()}
        running = len(self.scheduler.running)
        if plan.mode == "live":
            self.config = plan.new
            retracted = self.scheduler.set_limits(
                plan.new.max_running_requests, plan.new.chunked_prefill_size
            )
            self._event(
                "config_change",
                f"applied live: {plan.describe()}",
                {"changes": changes, "retracted": len(retracted)},
            )
            command.done.set_result(
                RestartResult("live", plan.changes, plan.new, 0.0, 0.0, running, True)
            )
            return
        started = time.perf_counter()
        since = self._last_token_at if running else started
        self.state = "restarting"
        self._event(
            "restart_begin",
            f"restart ({plan.mode}): {plan.describe()}",
            {
                "mode": plan.mode,
                "changes": changes,
                "running": running,
                "queued": len(self.scheduler.waiting),
            },
        )
        try:
            if plan.mode == "graphs":
                self._recapture(plan, command.progress)
            elif plan.keeps_kv:
                self._rebuild_runner(plan, command.progress)
            else:
                self._rebuild(plan, command.progress)
        except Exception as exc:
            self.state = "running"
            message = f"restart rejected, still running the old flags: {exc}"
            self._event("error", message, {"changes": changes, "restart_rejected": True})
            error = exc if isinstance(exc, ConfigError) else RestartError(message)
            command.done.set_exception(error)
            return
        self.state = "running"
        rebuild_s = time.perf_counter() - started
        result = RestartResult(
            plan.mode, plan.changes, plan.new, rebuild_s, rebuild_s, running, plan.keeps_kv
        )
        if running and self.scheduler.has_work():
            self._pending_gap = PendingGap(command, result, since)
        else:
            self._finish_restart(command, result)

    def _recapture(self, plan: RestartPlan, progress: Progress | None) -> None:
        """Only the graphs change: every request keeps its KV and its slot-table row."""
        self.runner.drop_cuda_graphs()
        if self.spec is not None:
            self.spec.drop_cuda_graphs()
        self.config = plan.new
        try:
            self._capture_cuda_graphs(progress)
        except Exception:
            self.config = plan.old
            self.runner.drop_cuda_graphs()
            self._capture_cuda_graphs(None)
            raise

    def _rebuild_runner(self, plan: RestartPlan, progress: Progress | None) -> None:
        """The KV layout stays (same pool, pages and page size): only the backend, slot table
        and graphs are built anew, and every running request keeps its KV."""
        self.runner.release()
        try:
            self.config = plan.new
            if plan.new.prefix_cache:
                self.scheduler.start_prefix_cache()
            self._build_runner()
            misfits = [m for m in map(self._misfit, self.scheduler.requests()) if m is not None]
            if misfits:
                raise RestartError(f"{misfits[0]} ({len(misfits)} request(s) would not fit)")
            self.scheduler.set_limits(plan.new.max_running_requests, plan.new.chunked_prefill_size)
            self.runner.adopt(self.scheduler.running)
            self._capture_cuda_graphs(progress)
        except Exception:
            self.runner.release()
            self.config = plan.old
            if not plan.old.prefix_cache:
                self.scheduler.stop_prefix_cache()
            self._build_runner()
            self.scheduler.set_limits(plan.old.max_running_requests, plan.old.chunked_prefill_size)
            self.runner.adopt(self.scheduler.running)
            self._capture_cuda_graphs(None)
            raise

    def _rebuild(self, plan: RestartPlan, progress: Progress | None) -> None:
        """New KV pool, slot table, backend and graphs (and weights, for a reload); the
        requests in flight go back to the queue with their output and are re-prefilled. Any
        failure puts the old runtime back before it propagates."""
        old_loaded: LoadedModel | None = self.loaded
        self.scheduler.requeue_running()
        carried = list(self.scheduler.waiting)
        self._teardown()
        try:
            if plan.mode == "reload":
                loaded = load_model(plan.new, progress)
                _check_same_tokenizer(self.loaded, loaded, carried)
                self.loaded = loaded
                if loaded.device.type == "cuda":  # the new pool may use the old weights' memory
                    old_loaded = None
                    torch.cuda.empty_cache()
            self.config = plan.new
            if progress is not None:
                progress("allocating KV cache", 0.95)
            self._build_runtime()
            misfits = [m for m in map(self._misfit, carried) if m is not None]
            if misfits:
                raise RestartError(f"{misfits[0]} ({len(misfits)} request(s) would not fit)")
            self._capture_cuda_graphs(progress)
        except Exception:
            self._teardown()
            self.config = plan.old
            self.loaded = old_loaded or load_model(plan.old, None)
            self._build_runtime()
            self._capture_cuda_graphs(None)
            self.scheduler.waiting.extend(carried)
            raise
        self.tokenizer = self.loaded.tokenizer
        self.model_name = self.loaded.source.name
        for req in carried:
            if req.params.max_tokens is None:  # "as long as fits" follows the new limit
                req.max_new_tokens = self.max_request_tokens - req.num_prompt_tokens
        self.scheduler.waiting.extend(carried)

    def _teardown(self) -> None:
        """Free the KV pool, slot table and graphs; the runner keeps no model reference."""
        if self.spec is not None:
            self.spec.release()
            self.spec = None
        self.runner.release()
        self.runner.model = None  # type: ignore[assignment]  # lets a reload free the weights
        self.pool.release()

    def _misfit(self, req: Request) -> str | None:
        """Why `req` cannot run under the current limits, or None. A request that asked for
        no particular max_tokens fits as long as it has room for one more token."""
        limit = self.max_request_tokens
        need = req.num_tokens + 1
        if req.params.max_tokens is not None:
            need = req.num_prompt_tokens + req.max_new_tokens
        if need <= limit:
            return None
        return (
            f"request {req.rid} needs {need} tokens of KV but the engine now serves at most "
            f"{limit} per request (context length {self.context_length}, KV pool "
            f"{self.scheduler.capacity_tokens} tokens)"
        )

    def _complete_gap(self) -> None:
        pending, self._pending_gap = self._pending_gap, None
        if pending is None:
            return
        gap = time.perf_counter() - pending.since
        result = dataclasses.replace(pending.result, gap_s=gap)
        self._finish_restart(pending.command, result)

    def _finish_restart(self, command: RestartCommand, result: RestartResult) -> None:
        self._event(
            "restart_end",
            f"restart done in {result.rebuild_s:.2f} s, no token for {result.gap_s:.2f} s; "
            f"{result.resumed_requests} request(s) resumed"
            + (" with their KV" if result.kv_kept else " by re-prefill"),
            result.to_dict(),
        )
        command.done.set_result(result)


def _check_same_tokenizer(old: LoadedModel, new: LoadedModel, carried: list[Request]) -> None:
    """Requests in flight carry token ids: they can only resume on a model that reads them the
    same way."""
    if not carried or old.tokenizer is None or new.tokenizer is None:
        return
    if old.tokenizer.get_vocab() != new.tokenizer.get_vocab():
        raise RestartError(
            f"{new.source.name} has a different tokenizer from {old.source.name}; "
            f"{len(carried)} request(s) in flight could not resume on it"
        )
