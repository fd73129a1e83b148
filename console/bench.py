"""`llmconsole bench`: registers its subcommands. Each lives in its own module: `offline`
(bench_offline), `startup` (bench_startup), `serve` (bench_serve) and `api-overhead`
(bench_overhead)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from llmconsole.core.config import EngineConfig

from .bench_offline import OfflineArgs, bench_offline
from .bench_startup import bench_startup

# Module-level: ruff (B008) wants no calls in the defaults of a non-scalar parameter.
OFFLINE_OUTPUT = typer.Option(None, help="append one JSON row per measured run (JSONL)")
STARTUP_OUTPUT = typer.Option(None, help="append one JSON row per start (JSONL)")


def register(
    bench_app: typer.Typer,
    engine_flags: Callable[[Callable[..., Any]], Callable[..., Any]],
    start_engine: Callable[..., Any],
) -> None:
    """Add `offline` and `startup` to the `llmconsole bench` group, then `serve` and
    `api-overhead` from their own modules."""

    @bench_app.command("offline")
    @engine_flags
    def offline(
        num_prompts: int = typer.Option(32, help="requests to run"),
        concurrency: int = typer.Option(8, help="requests kept in flight (closed loop)"),
        max_tokens: int = typer.Option(64, help="tokens every request generates (EOS ignored)"),
        dataset: str = typer.Option("builtin", help="builtin (shipped prompts) | random (ids)"),
        input_len: int = typer.Option(128, help="prompt tokens per request, --dataset random"),
        chat: bool = typer.Option(
            True, "--chat/--no-chat", help="wrap builtin prompts in the chat template"
        ),
        compare_hf: bool = typer.Option(
            False, "--compare-hf", help="also time transformers' generate() on the same ids"
        ),
        hf_batch1_prompts: int = typer.Option(4, help="prompts for the batch-1 comparison"),
        rounds: int = typer.Option(
            1, help="with --compare-hf: alternate ours and transformers N times, median ratio"
        ),
        output_file: Path | None = OFFLINE_OUTPUT,
        *,
        config: EngineConfig,
    ) -> None:
        """Throughput on a fixed prompt set, greedy, exactly --max-tokens tokens per request."""
        args = OfflineArgs(
            num_prompts=num_prompts,
            concurrency=concurrency,
            max_tokens=max_tokens,
            dataset=dataset,
            input_len=input_len,
            chat=chat,
            compare_hf=compare_hf,
            hf_batch1_prompts=hf_batch1_prompts,
            output_file=output_file,
            rounds=rounds,
        )
        bench_offline(args, config, start_engine)

    @bench_app.command("startup")
    @engine_flags
    def startup(
        fresh_cache: bool = typer.Option(
            True,
            "--fresh-cache/--warm",
            help="time a first start (GGUF conversion) and a later one in a temp cache, "
            "or one start with your existing cache",
        ),
        output_file: Path | None = STARTUP_OUTPUT,
        *,
        config: EngineConfig,
    ) -> None:
        """Process launch -> first streamed token, each start in a fresh Python process."""
        bench_startup(config, fresh_cache, output_file)

    from .bench_console import register_console_bench
    from .bench_one_batch import register_one_batch
    from .bench_overhead import register_overhead
    from .bench_restart import register_restart_bench
    from .bench_serve import register_serve
    from .bench_spec import register_spec_bench
    from .bench_tune import register_tune

    register_serve(bench_app)
    register_overhead(bench_app, engine_flags, start_engine)
    register_console_bench(bench_app, engine_flags, start_engine)
    register_one_batch(bench_app, engine_flags)
    register_restart_bench(bench_app, engine_flags, start_engine)
    register_spec_bench(bench_app, engine_flags, start_engine)
    register_tune(bench_app)
