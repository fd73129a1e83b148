"""`llmconsole bench api-overhead`: the same prompts through HTTP and straight into the engine,
in one process and one run, so the API's cost is a ratio measured side by side. `--rounds N`
alternates the two paths N times and reports the median ratio: on a shared machine one pair
of runs can land on either side of a slow spell."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from llmconsole.core.config import EngineConfig

from .bench_common import append_jsonl, machine_info
from .bench_runs import RunRecords, run_ours, warm_up
from .prompts import builtin_prompts


def register_overhead(bench_app: typer.Typer, engine_flags: Any, start_engine: Any) -> None:
    @bench_app.command("api-overhead")
    @engine_flags
    def api_overhead(
        num_prompts: int = typer.Option(64, help="requests in each run"),
        concurrency: int = typer.Option(32, help="requests in flight"),
        max_tokens: int = typer.Option(64, help="tokens per request (ignore_eos)"),
        output_file: Path | None = typer.Option(None, help="append JSON rows here"),
        rounds: int = typer.Option(1, help="alternate HTTP and offline N times; median ratio"),
        *,
        config: EngineConfig,
    ) -> None:
        """HTTP (official API, streamed) vs offline engine tok/s on the same prompts."""
        from llmconsole.core.server import ApiServer

        from .cli import CliError

        for name, value in (
            ("--num-prompts", num_prompts),
            ("--concurrency", concurrency),
            ("--max-tokens", max_tokens),
            ("--rounds", rounds),
        ):
            if value < 1:
                raise CliError(f"{name} must be >= 1, got {value}")
        out = Console()
        engine = start_engine(config)
        pairs: list[tuple[dict[str, Any], Any]] = []
        try:
            pool = builtin_prompts()  # bench serve's builtin dataset: the same texts, same order
            texts = [pool[i % len(pool)] for i in range(num_prompts)]
            prompts = [engine.tokenize(t) for t in texts]
            records = RunRecords(engine)
            with ApiServer(engine, host="127.0.0.1", port=0) as server:
                for _ in range(rounds):
                    engine.flush_cache()  # as run_ours does: both paths start cold
                    http = _http_run(server.url, num_prompts, concurrency, max_tokens)
                    warm_up(engine, records, prompts[0])
                    offline = run_ours(engine, records, prompts, max_tokens, concurrency)
                    pairs.append((http, offline))
        finally:
            engine.shutdown()
        ratios = [http["output_throughput"] / offline.output_tok_s for http, offline in pairs]
        table = Table(title=f"{engine.model_name}: {num_prompts} prompts x {max_tokens} tokens")
        for column in ("round", "path", "concurrency", "output tokens", "seconds", "output tok/s"):
            table.add_column(column, justify="right")
        for i, (http, offline) in enumerate(pairs, 1):
            table.add_row(
                str(i),
                "HTTP (streamed)",
                str(concurrency),
                str(http["total_output_tokens"]),
                f"{http['duration_s']:.2f}",
                f"{http['output_throughput']:.1f}",
            )
            table.add_row(
                str(i),
                "offline engine",
                str(concurrency),
                str(offline.output_tokens),
                f"{offline.seconds:.2f}",
                f"{offline.output_tok_s:.1f}",
            )
        out.print(table)
        median = statistics.median(ratios)
        if rounds > 1:
            spread = f" (rounds: {', '.join(f'{r:.3f}' for r in ratios)})"
        else:
            spread = ""
        out.print(f"HTTP / offline output tok/s: [bold]{median:.3f}[/bold]{spread}")
        if output_file is not None:
            rows = [
                {
                    "bench": "api-overhead",
                    "model": engine.model_name,
                    "num_prompts": num_prompts,
                    "concurrency": concurrency,
                    "max_tokens": max_tokens,
                    "round": i,
                    "http_output_tok_s": round(http["output_throughput"], 2),
                    "offline_output_tok_s": round(offline.output_tok_s, 2),
                    "ratio": round(ratio, 4),
                    "median_ratio": round(median, 4),
                    "time": time.time(),
                    **machine_info(),
                }
                for i, ((http, offline), ratio) in enumerate(zip(pairs, ratios, strict=True), 1)
            ]
            append_jsonl(output_file, rows)


def _http_run(base_url: str, num_prompts: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """`bench serve` in its own process, as a real client would be: it must not share this
    process's GIL with the engine and the API thread it is measuring."""
    from .cli import CliError

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "http.jsonl"
        cmd = [
            sys.executable, "-m", "llmconsole.console", "bench", "serve",
            "--base-url", base_url, "--endpoint", "completions", "--dataset", "builtin",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--max-tokens", str(max_tokens), "--output-file", str(result),
        ]  # fmt: skip
        env = {**os.environ, "COLUMNS": "120"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not result.exists():
            raise CliError(f"the HTTP client failed: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads(result.read_text().splitlines()[-1])
