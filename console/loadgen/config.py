"""What one `bench serve` run does: ServeBenchConfig, and its checks before any request."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..bench_common import fail

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DATASETS = ("builtin", "random", "sharegpt")


@dataclass(frozen=True)
class ServeBenchConfig:
    """One benchmark run; defaults follow SGLang's bench_serving where it has one."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id from GET /v1/models
    api_key: str | None = None
    endpoint: str = "completions"  # completions | chat
    num_prompts: int = 100
    max_concurrency: int | None = None  # None: unlimited
    request_rate: float = math.inf  # requests/s; inf: all at once
    dataset: str = "builtin"  # builtin | random | sharegpt
    dataset_path: str | None = None
    sharegpt_output_len: int | None = None
    random_input_len: int = 1024
    random_output_len: int = 1024
    random_range_ratio: float = 0.0
    max_tokens: int | None = None  # overrides every request's budget; builtin default 128
    seed: int = 1
    disable_ignore_eos: bool = False
    warmup: bool = True


def check_config(config: ServeBenchConfig) -> None:
    if not config.base_url.startswith(("http://", "https://")):
        fail(f"--base-url must start with http:// or https://, got {config.base_url!r}")
    if config.endpoint not in ENDPOINTS:
        fail(f"unknown endpoint {config.endpoint!r} (choose {' or '.join(ENDPOINTS)})")
    if config.dataset not in DATASETS:
        fail(f"unknown dataset {config.dataset!r} (choose {', '.join(DATASETS)})")
    minimums = {
        "--num-prompts": config.num_prompts,
        "--max-concurrency": config.max_concurrency,
        "--max-tokens": config.max_tokens,
        "--random-input-len": config.random_input_len,
        "--random-output-len": config.random_output_len,
        "--sharegpt-output-len": config.sharegpt_output_len,
    }
    for flag, value in minimums.items():
        if value is not None and value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    if not config.request_rate > 0:  # also rejects nan
        fail(f"--request-rate must be > 0 (inf: all at once), got {config.request_rate}")
    if not 0.0 <= config.random_range_ratio <= 1.0:
        fail(f"--random-range-ratio must be within [0, 1], got {config.random_range_ratio}")
