"""The console's built-in load (`l`): real streaming requests through the in-process OpenAI API,
on a thread of their own, stoppable at any time.

It reuses `bench serve`'s client, so a load fired from the console is the same traffic as a
benchmark run: same prompts, same HTTP, same metrics at the end.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .loadgen.client import run_benchmark
from .loadgen.config import ServeBenchConfig
from .loadgen.results import ServeBenchResult


@dataclass(frozen=True)
class LoadSettings:
    concurrency: int = 8
    num_requests: int = 32
    max_tokens: int = 64
    dataset_path: str | None = None  # a ShareGPT JSON file; None: the built-in prompts

    def __post_init__(self) -> None:
        for name, value in (
            ("concurrency", self.concurrency),
            ("requests", self.num_requests),
            ("max-tokens", self.max_tokens),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def bench_config(self, base_url: str, api_key: str | None) -> ServeBenchConfig:
        return ServeBenchConfig(
            base_url=base_url,
            api_key=api_key,
            num_prompts=self.num_requests,
            max_concurrency=self.concurrency,
            dataset="sharegpt" if self.dataset_path else "builtin",
            dataset_path=self.dataset_path,
            sharegpt_output_len=self.max_tokens if self.dataset_path else None,
            max_tokens=self.max_tokens,
            warmup=False,
        )

    def describe(self) -> str:
        prompts = self.dataset_path or "built-in prompts"
        return (
            f"{self.num_requests} requests, concurrency {self.concurrency}, "
            f"max_tokens {self.max_tokens}, {prompts}"
        )


@dataclass(frozen=True)
class LoadOutcome:
    settings: LoadSettings
    result: ServeBenchResult | None  # None when stopped or failed before the end
    error: str = ""
    stopped: bool = False

    def summary(self) -> str:
        if self.stopped:
            return f"load stopped ({self.settings.describe()})"
        if self.result is None:
            return f"load failed: {self.error}"
        m = self.result.metrics
        ttft = "—" if m.ttft_ms.mean is None else f"{m.ttft_ms.mean:.0f} ms"
        return (
            f"load finished: {m.completed} ok, {m.failed} failed, "
            f"{m.output_throughput:.1f} output tok/s, mean TTFT {ttft}"
        )


class LoadRunner:
    """One load at a time. `progress(done, total)` and `done(outcome)` are called on the load's
    thread: the console hands them to its own thread with `call_from_thread`."""

    def __init__(
        self,
        settings: LoadSettings,
        base_url: str,
        api_key: str | None,
        progress: Callable[[int, int], None],
        done: Callable[[LoadOutcome], None],
    ) -> None:
        self.settings = settings
        self._config = settings.bench_config(base_url, api_key)
        self._progress = progress
        self._done = done
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[ServeBenchResult] | None = None
        self._stopping = False
        self.outcome: LoadOutcome | None = None  # set when the load ends
        self._thread = threading.Thread(target=self._run, name="llmconsole-load", daemon=True)

    def start(self) -> LoadRunner:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, wait_s: float = 10.0) -> None:
        """Cancel every in-flight request (their streams close, so the server aborts them)."""
        self._stopping = True
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)
        if threading.current_thread() is not self._thread:
            self._thread.join(wait_s)

    def _run(self) -> None:
        from .cli import CliError

        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._task = loop.create_task(run_benchmark(self._config, self._progress))
            if self._stopping:
                self._task.cancel()
            result = loop.run_until_complete(self._task)
            outcome = LoadOutcome(self.settings, result)
        except asyncio.CancelledError:
            outcome = LoadOutcome(self.settings, None, stopped=True)
        except CliError as exc:
            outcome = LoadOutcome(self.settings, None, error=str(exc))
        except Exception as exc:  # a load must never take the console down
            outcome = LoadOutcome(self.settings, None, error=repr(exc))
        finally:
            loop.close()
        self.outcome = outcome
        self._done(outcome)

    def wait(self, timeout: float | None = None) -> LoadOutcome | None:
        self._thread.join(timeout)
        return self.outcome
