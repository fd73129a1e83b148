"""Prometheus metrics for one engine, derived from its telemetry on the scrape thread.

The engine thread only appends telemetry records; `EngineMetrics.render()` drains its own
subscription, folds the new records into counters and histograms, reads the live gauges from
`stats()` and returns the text exposition. Names mirror SGLang's (`sglang:` -> `llmconsole:`) so
existing dashboards carry over. Each instance owns a private registry, so several engines (or
tests) in one process never share a time series.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..request import FinishReason
from ..telemetry import Record, RequestRecord, StepRecord, read_rate

PREFIX = "llmconsole:"
WINDOW_S = 5.0

# Bucket bounds in seconds, from milliseconds to minutes: a tiny model on a GPU answers in a few
# ms, a long prompt behind a full queue on a CPU takes minutes.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0,
    45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0,
)  # fmt: skip


class _Poller(Protocol):
    dropped: int

    def poll(self) -> Sequence[Record]: ...


class EngineLike(Protocol):
    """What the metrics need from an engine; tests pass a small object on a real buffer."""

    def subscribe(self) -> _Poller: ...

    def stats(self) -> Mapping[str, int]: ...


@dataclass(frozen=True)
class _RecentStep:
    start: float
    end: float
    generated: int
    batch_size: int
    drafted: int
    accepted: int
    decode_bytes: int  # bytes read, decode steps only (0 for others)


class EngineMetrics:
    """The `/metrics` body for one engine; `render()` is safe to call from any thread."""

    def __init__(
        self,
        engine_like: EngineLike,
        model_name: str,
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine_like
        self._sub = engine_like.subscribe()
        self._window_s = window_s
        self._clock = clock  # step times are epoch seconds, so "now" must be too
        self._recent: deque[_RecentStep] = deque()
        self._dropped_seen = 0
        self._lock = threading.Lock()
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, ["model_name"], registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, ["model_name", *extra], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(
                PREFIX + name, doc, ["model_name"], buckets=buckets, registry=self.registry
            )

        m = model_name
        self.num_running_reqs = gauge("num_running_reqs", "Requests in the running batch.")
        self.num_queue_reqs = gauge("num_queue_reqs", "Requests waiting to be scheduled.")
        self.num_used_tokens = gauge("num_used_tokens", "KV cache slots in use (pages x size).")
        self.token_usage = gauge("token_usage", "Fraction of usable KV pages in use, 0..1.")
        self.num_cached_tokens = gauge(
            "num_cached_tokens", "KV slots the prefix cache holds (running requests may read some)."
        )
        self.cache_hit_rate = gauge(
            "cache_hit_rate",
            "Prompt tokens read from the prefix cache / prompt tokens, finished requests.",
        )
        self._prompt_total = self._cached_total = 0
        self.gen_throughput = gauge(
            "gen_throughput", f"Generated tokens/s over the last {window_s:g} s of steps."
        )
        self.spec_accept_length = gauge(
            "spec_accept_length",
            "Tokens per request per verify pass, (accepted + bs) / bs, over recent steps.",
        )
        self.spec_accept_rate = gauge(
            "spec_accept_rate", "Accepted / drafted tokens over recent steps."
        )
        self.decode_read_bandwidth = gauge(
            "decode_read_bytes_per_second",
            f"Bytes decode steps read (weights + attended KV) / their time, last {window_s:g} s.",
        )
        self.memory_copy_bandwidth = gauge(
            "memory_copy_bytes_per_second",
            "The device's copy rate (read + written bytes / s), measured at start: the yardstick.",
        )
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens of finished requests.")
        self.cached_tokens = counter(
            "cached_tokens_total", "Prompt tokens of finished requests served from the cache."
        )
        self.generation_tokens = counter("generation_tokens_total", "Tokens sampled.")
        self.read_bytes = counter(
            "read_bytes_total", "Bytes forward passes read at least: weights and attended KV."
        )
        self.num_requests = counter("num_requests_total", "Finished requests.")
        self.request_finished = counter(
            "request_finished_total", "Finished requests by finish reason.", ("finish_reason",)
        )
        self.cuda_graph_steps = counter("cuda_graph_steps_total", "Steps replayed as a graph.")
        self.eager_steps = counter("eager_steps_total", "Steps run eagerly.")
        self.retracted_requests = counter(
            "retracted_requests_total", "Requests preempted to free KV pages."
        )
        self.dropped_records = counter(
            "telemetry_dropped_records_total",
            "Telemetry records overwritten before a scrape read them; counters undercount by "
            "what they held.",
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS
        )
        # One observation per decode step, its duration: every running request got exactly one
        # token in that time, so this is each request's inter-token latency without per-token
        # time stamps (weighted by step, not by request).
        self.itl = histogram(
            "inter_token_latency_seconds", "Decode step duration (one token per request).",
            ITL_BUCKETS,
        )  # fmt: skip
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)

        # Children exist up front so every series is exported (as 0) before the first request:
        # rate() over a series that appears mid-way loses its first increment.
        for metric in (
            self.prompt_tokens, self.cached_tokens, self.generation_tokens, self.read_bytes,
            self.num_requests,
            self.cuda_graph_steps, self.eager_steps, self.retracted_requests,
            self.dropped_records, self.ttft, self.itl, self.e2e,
        ):  # fmt: skip
            metric.labels(model_name=m)
        for reason in FinishReason:
            self.request_finished.labels(model_name=m, finish_reason=reason.value)

    def render(self) -> tuple[bytes, str]:
        """Fold in what arrived since the last call and return (body, content type)."""
        with self._lock:
            self._update()
            return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # ---- internals ---------------------------------------------------------------------------

    def _update(self) -> None:
        records = self._sub.poll()
        dropped = self._sub.dropped - self._dropped_seen
        self._dropped_seen = self._sub.dropped
        m = self.model_name
        if dropped:
            self.dropped_records.labels(model_name=m).inc(dropped)
        for rec in records:
            if isinstance(rec, StepRecord):
                self._on_step(rec)
            elif isinstance(rec, RequestRecord):
                self._on_request(rec)
        self._update_windowed()
        stats = self._engine.stats()
        used, total = stats["kv_pages_used"], stats["kv_pages_total"]
        self.num_running_reqs.labels(model_name=m).set(stats["running"])
        self.num_queue_reqs.labels(model_name=m).set(stats["queued"])
        self.num_used_tokens.labels(model_name=m).set(used * stats["page_size"])
        self.token_usage.labels(model_name=m).set(used / total if total else 0.0)
        cached = stats.get("kv_pages_cached", 0) * stats["page_size"]
        self.num_cached_tokens.labels(model_name=m).set(cached)
        prompt = self._prompt_total
        self.cache_hit_rate.labels(model_name=m).set(self._cached_total / prompt if prompt else 0.0)
        copy = stats.get("memory_copy_bytes_per_s", 0)
        self.memory_copy_bandwidth.labels(model_name=m).set(copy)

    def _on_step(self, step: StepRecord) -> None:
        m = self.model_name
        self.generation_tokens.labels(model_name=m).inc(step.num_generated)
        self.read_bytes.labels(model_name=m).inc(step.bytes_read)
        (self.cuda_graph_steps if step.cuda_graph else self.eager_steps).labels(model_name=m).inc()
        if step.retracted:
            self.retracted_requests.labels(model_name=m).inc(step.retracted)
        if step.kind == "decode":
            self.itl.labels(model_name=m).observe(step.duration_s)
        self._recent.append(
            _RecentStep(
                start=step.time - step.duration_s,
                end=step.time,
                generated=step.num_generated,
                batch_size=step.batch_size,
                drafted=step.drafted_tokens,
                accepted=step.accepted_tokens,
                decode_bytes=step.bytes_read if step.kind == "decode" else 0,
            )
        )

    def _on_request(self, rec: RequestRecord) -> None:
        m = self.model_name
        self.prompt_tokens.labels(model_name=m).inc(rec.prompt_tokens)
        self.cached_tokens.labels(model_name=m).inc(rec.cached_tokens)
        self._prompt_total += rec.prompt_tokens
        self._cached_total += rec.cached_tokens
        self.num_requests.labels(model_name=m).inc()
        self.request_finished.labels(model_name=m, finish_reason=rec.finish_reason).inc()
        if rec.ttft_s is not None:
            self.ttft.labels(model_name=m).observe(rec.ttft_s)
        self.e2e.labels(model_name=m).observe(rec.e2e_s)

    def _update_windowed(self) -> None:
        """Throughput and speculative acceptance over the steps that ended in the last window."""
        now = self._clock()
        window_start = now - self._window_s
        while self._recent and self._recent[0].end < window_start:
            self._recent.popleft()
        steps = list(self._recent)
        m = self.model_name

        # Divide by the time the window's steps span up to now (not the full window), so a burst
        # that began 1 s ago reads at its real rate, and an idle engine decays to 0.
        throughput = 0.0
        if steps:
            span = now - max(window_start, min(s.start for s in steps))
            if span > 0:
                throughput = sum(s.generated for s in steps) / span
        self.gen_throughput.labels(model_name=m).set(throughput)

        # SGLang counts one forward pass per request in a verify batch: accept length is the
        # tokens each request gained per pass, (accepted + bs) / bs summed over the steps.
        spec = [s for s in steps if s.drafted > 0]
        passes = sum(s.batch_size for s in spec)
        accepted = sum(s.accepted for s in spec)
        drafted = sum(s.drafted for s in spec)
        self.spec_accept_length.labels(model_name=m).set(
            (accepted + passes) / passes if passes else 0.0
        )
        self.spec_accept_rate.labels(model_name=m).set(accepted / drafted if drafted else 0.0)

        # Decode is memory-bound: its bytes over its own time, set against the copy rate.
        rate = read_rate((s.decode_bytes, s.end - s.start) for s in steps)
        self.decode_read_bandwidth.labels(model_name=m).set(rate or 0.0)
