"""What a `bench serve` run measured: each request's output, and SGLang's metrics over them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .config import ServeBenchConfig
from .stats import Summary, inter_token_latencies, summarize_ms, time_per_output_token


@dataclass(frozen=True)
class RequestOutput:
    """What one streamed request did; times are seconds since the benchmark started."""

    success: bool
    start_s: float
    end_s: float
    chunk_times_s: tuple[float, ...]  # arrival of each chunk that carried content
    output_tokens: int
    prompt_tokens: int | None  # None: the server sent no usage
    error: str = ""

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] - self.start_s if self.chunk_times_s else None

    @property
    def itl_s(self) -> list[float]:
        return inter_token_latencies(self.chunk_times_s)

    @property
    def tpot_s(self) -> float | None:
        return time_per_output_token(self.latency_s, self.ttft_s, self.output_tokens)


@dataclass(frozen=True)
class ServeMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float
    ttft_ms: Summary
    tpot_ms: Summary
    itl_ms: Summary
    e2e_latency_ms: Summary

    def as_dict(self) -> dict[str, Any]:
        """Flat, with SGLang's key names (mean_ttft_ms, p99_itl_ms, ...)."""
        row: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, dict):
                name = key.removesuffix("_ms")
                row.update({f"{stat}_{name}_ms": v for stat, v in value.items()})
            else:
                row[key] = value
        return row


@dataclass(frozen=True)
class ServeBenchResult:
    config: ServeBenchConfig
    model: str
    metrics: ServeMetrics
    outputs: tuple[RequestOutput, ...]
    timestamp: str

    @property
    def no_usage(self) -> int:
        return sum(1 for o in self.outputs if o.success and o.prompt_tokens is None)

    def to_row(self) -> dict[str, Any]:
        """Arguments + metrics for a JSONL file; the API key stays out of it."""
        args = asdict(self.config)
        args.pop("api_key")
        if math.isinf(args["request_rate"]):
            args["request_rate"] = "inf"  # JSON has no infinity
        first_error = next((o.error for o in self.outputs if not o.success), "")
        return {
            "timestamp": self.timestamp,
            **args,
            "model": self.model,
            **self.metrics.as_dict(),
            "first_error": first_error,
        }


def _per_second(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else 0.0


def compute_metrics(outputs: Sequence[RequestOutput], duration_s: float) -> ServeMetrics:
    """SGLang's definitions, over successful requests only."""
    ok = [o for o in outputs if o.success]
    input_tokens = sum(o.prompt_tokens or 0 for o in ok)
    output_tokens = sum(o.output_tokens for o in ok)
    latencies = [o.latency_s for o in ok]
    return ServeMetrics(
        completed=len(ok),
        failed=len(outputs) - len(ok),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=_per_second(len(ok), duration_s),
        input_throughput=_per_second(input_tokens, duration_s),
        output_throughput=_per_second(output_tokens, duration_s),
        total_throughput=_per_second(input_tokens + output_tokens, duration_s),
        concurrency=_per_second(sum(latencies), duration_s),
        ttft_ms=summarize_ms([o.ttft_s for o in ok if o.ttft_s is not None]),
        tpot_ms=summarize_ms([o.tpot_s for o in ok if o.tpot_s is not None]),
        itl_ms=summarize_ms([gap for o in ok for gap in o.itl_s]),
        e2e_latency_ms=summarize_ms(latencies),
    )
