"""Pure statistics of a serving benchmark: percentiles, latency summaries, Poisson arrivals."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True)
class Summary:
    """Mean, median and p99 in milliseconds; None when nothing was measured."""

    mean: float | None
    median: float | None
    p99: float | None


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as SGLang reports)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_ms(values_s: Sequence[float]) -> Summary:
    if not values_s:
        return Summary(None, None, None)
    ms = [v * 1e3 for v in values_s]
    return Summary(mean=statistics.fmean(ms), median=percentile(ms, 50), p99=percentile(ms, 99))


def inter_token_latencies(chunk_times_s: Sequence[float]) -> list[float]:
    """Gaps between consecutive content chunks (a chunk may carry several tokens)."""
    return [b - a for a, b in pairwise(chunk_times_s)]


def time_per_output_token(latency_s: float, ttft_s: float | None, tokens: int) -> float | None:
    """Decode time per token after the first; undefined for fewer than two tokens."""
    if ttft_s is None or tokens < 2:
        return None
    return (latency_s - ttft_s) / (tokens - 1)


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """When each request is due, in seconds from the start: a Poisson process (exponential gaps)
    whose first request goes at once, as in SGLang; rate inf sends everything at once."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(f"{seed}:arrivals")
    offsets, due = [], 0.0
    for _ in range(count):
        offsets.append(due)
        due += rng.expovariate(rate)
    return offsets
