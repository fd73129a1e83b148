"""`llmconsole bench console`: does the open console slow the engine? The same load, from the
console's own load generator, runs headless and with the console app open, alternating in one
process; the figure is the ratio of engine output tok/s (median over rounds).

Rounds alternate which side goes first (headless, console | console, headless | ...), so a drift
in the machine's speed over the run does not always favour one side. The console side opens the
app and lets its first layout and paint finish before the load starts: the figure is the cost of
a console that is open, as an operator has it when they fire a load, not of opening one."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from llmconsole.core.config import EngineConfig
from llmconsole.core.engine import Engine
from llmconsole.core.telemetry import StepRecord

from .bench_common import append_jsonl, check_min, machine_info
from .load_runner import LoadOutcome, LoadRunner, LoadSettings

SETTLE_S = 2.0


def round_order(index: int) -> tuple[str, str]:
    """Which side runs first in round `index`: alternating, so drift cancels over rounds."""
    return ("headless", "console") if index % 2 == 0 else ("console", "headless")


Row = dict[str, Any]


def round_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(headless, console) per round, whichever ran first."""
    by_key = {(r["round"], r["mode"]): r for r in rows}
    rounds = sorted({r["round"] for r in rows})
    return [(by_key[i, "headless"], by_key[i, "console"]) for i in rounds]


def round_ratio(headless: Row, console: Row) -> float | None:
    if not headless["engine_tok_s"]:
        return None
    return float(console["engine_tok_s"] / headless["engine_tok_s"])


@dataclass(frozen=True)
class RatioSummary:
    median: float
    geometric_mean: float
    # Standard error of the geometric mean, as a factor: the mean of log-ratios +- one standard
    # error, exponentiated. On a VM whose single rounds swing by +-10% this says how many rounds
    # a verdict needs (8 rounds: ~+-3%).
    low: float
    high: float


def summarize_ratios(ratios: list[float]) -> RatioSummary:
    """Median and geometric mean of the per-round console/headless ratios (NaN when empty)."""
    if not ratios:
        nan = float("nan")
        return RatioSummary(nan, nan, nan, nan)
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    sem = statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else float("nan")
    return RatioSummary(
        statistics.median(ratios), math.exp(mean), math.exp(mean - sem), math.exp(mean + sem)
    )


def engine_tokens_per_s(engine: Engine, since_step: int) -> float:
    """Output tokens per second of engine wall time over the steps after `since_step`."""
    steps = [
        r
        for r in engine.telemetry.snapshot()
        if isinstance(r, StepRecord) and r.step_id > since_step
    ]
    if not steps:
        return 0.0
    elapsed = steps[-1].time - (steps[0].time - steps[0].duration_s)
    return sum(s.num_generated for s in steps) / elapsed if elapsed > 0 else 0.0


def _last_step(engine: Engine) -> int:
    return max(
        (r.step_id for r in engine.telemetry.snapshot() if isinstance(r, StepRecord)), default=-1
    )


def run_headless(engine: Engine, url: str, settings: LoadSettings) -> tuple[float, LoadOutcome]:
    since = _last_step(engine)
    runner = LoadRunner(settings, url, engine.config.api_key, lambda d, t: None, lambda o: None)
    outcome = runner.start().wait()
    assert outcome is not None
    return engine_tokens_per_s(engine, since), outcome


def run_with_console(engine: Engine, settings: LoadSettings) -> tuple[float, LoadOutcome]:
    """The real app (every panel, 10 Hz refresh) on Textual's headless driver at 120x40."""
    from .app import ConsoleApp

    since = _last_step(engine)
    app = ConsoleApp(engine=engine)
    runners: list[LoadRunner] = []

    async def drive() -> None:
        async with app.run_test(size=(120, 40)):
            # A plain sleep (Pilot.pause() would add its own work): mounting and the first
            # paints are over within it, and the periodic repaints have begun.
            await asyncio.sleep(SETTLE_S)
            runners.append(app.start_load(settings))
            while runners[0].running:
                # A plain sleep: Pilot.pause() would add its own work to the console's.
                await asyncio.sleep(0.25)

    asyncio.run(drive())
    app.shutdown()
    outcome = runners[0].outcome
    assert outcome is not None
    return engine_tokens_per_s(engine, since), outcome


def register_console_bench(bench_app: typer.Typer, engine_flags: Any, start_engine: Any) -> None:
    @bench_app.command("console")
    @engine_flags
    def console_bench(
        num_prompts: int = typer.Option(32, help="requests per run"),
        concurrency: int = typer.Option(8, help="requests in flight"),
        max_tokens: int = typer.Option(64, help="tokens per request (EOS ignored)"),
        rounds: int = typer.Option(3, help="headless/console pairs; the median ratio is reported"),
        output_file: Path | None = typer.Option(None, help="append JSON rows here"),
        *,
        config: EngineConfig,
    ) -> None:
        """Engine tok/s headless vs with the console open, same load, same process."""
        from llmconsole.core.server import ApiServer

        for flag, value in (
            ("--num-prompts", num_prompts),
            ("--concurrency", concurrency),
            ("--max-tokens", max_tokens),
            ("--rounds", rounds),
        ):
            check_min(flag, value)
        settings = LoadSettings(concurrency, num_prompts, max_tokens)
        out = Console()
        engine = start_engine(config)
        rows: list[dict[str, Any]] = []
        try:
            with ApiServer(engine, "127.0.0.1", 0, config.api_key) as server:
                warm = LoadSettings(concurrency, concurrency, 8)
                run_headless(engine, server.url, warm)
                for index in range(rounds):
                    for mode in round_order(index):
                        engine.flush_cache()  # both modes start cold
                        started = time.perf_counter()
                        if mode == "headless":
                            tok_s, outcome = run_headless(engine, server.url, settings)
                        else:
                            tok_s, outcome = run_with_console(engine, settings)
                        if outcome.result is None or outcome.result.metrics.failed:
                            raise RuntimeError(f"the {mode} load failed: {outcome.summary()}")
                        rows.append(
                            {
                                "round": index,
                                "mode": mode,
                                "engine_tok_s": tok_s,
                                "client_tok_s": outcome.result.metrics.output_throughput,
                                "wall_s": time.perf_counter() - started,
                            }
                        )
                        out.print(f"round {index + 1}/{rounds} {mode}: {tok_s:.1f} tok/s")
        finally:
            engine.shutdown()
        pairs = round_pairs(rows)
        per_round = [round_ratio(h, c) for h, c in pairs]
        ratios = [r for r in per_round if r is not None]
        table = Table(title=f"console overhead: {settings.describe()}")
        for col in ("round", "headless tok/s", "console tok/s", "console / headless"):
            table.add_column(col, justify="right")
        for i, ((h, c), ratio) in enumerate(zip(pairs, per_round, strict=True)):
            table.add_row(
                f"{i + 1} ({round_order(i)[0]} first)",
                f"{h['engine_tok_s']:.1f}",
                f"{c['engine_tok_s']:.1f}",
                "—" if ratio is None else f"{ratio:.3f}",
            )
        out.print(table)
        stats = summarize_ratios(ratios)
        median = stats.median
        out.print(f"median console/headless engine tok/s: [bold]{median:.3f}[/bold]")
        out.print(
            f"geometric mean {stats.geometric_mean:.3f} "
            f"(one standard error: {stats.low:.3f}–{stats.high:.3f})"
        )
        if output_file is not None:
            summary = {
                "bench": "console",
                "model": engine.model_name,
                "device": engine.config.device,
                **settings.__dict__,
                "rounds": rounds,
                "median_ratio": median,
                "geometric_mean_ratio": stats.geometric_mean,
                "geometric_mean_stderr_range": [stats.low, stats.high],
                "runs": rows,
                **machine_info(),
            }
            append_jsonl(output_file, [summary])
