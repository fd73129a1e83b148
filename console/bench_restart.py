"""`llmconsole bench restart`: how long does a hot restart stop the tokens? Requests decode
without end while the engine is restarted with each `--set` in turn; each restart reports its
rebuild time and its gap (last token before -> first token after, at the engine)."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from llmconsole.core.config import EngineConfig
from llmconsole.core.engine import Engine
from llmconsole.core.outputs import RequestHandle
from llmconsole.core.restart import coerce
from llmconsole.core.sampling_params import SamplingParams

from .bench_common import append_jsonl, check_min, fail, json_rows, machine_info

SET_HELP = (
    "flags to restart with, FIELD=VALUE[,FIELD=VALUE] (e.g. cuda_graph_max_bs=32 or "
    "--cuda-graph-max-bs=32); repeat --set to cycle through several"
)
SETS = typer.Option(..., "--set", help=SET_HELP)
OUTPUT = typer.Option(None, help="append one JSON row per restart (JSONL)")


def parse_set(text: str) -> dict[str, str]:
    """'cuda_graph_max_bs=32,--max-running-requests=8' -> {field: value text}."""
    changes: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip("- "):
            fail(f"--set takes FIELD=VALUE pairs, got {part!r}")
        changes[name.strip().lstrip("-").replace("-", "_")] = value.strip()
    if not changes:
        fail("--set needs at least one FIELD=VALUE")
    for name, value in changes.items():
        coerce(name, value)  # a typo fails here, before a model is loaded
    return changes


def _start_load(engine: Engine, concurrency: int, input_len: int) -> list[RequestHandle]:
    """`concurrency` requests on random prompt ids that decode until aborted."""
    rng = random.Random(0)
    vocab = engine.loaded.model_config.vocab_size
    # As long as fits: the requests outlast the bench and are aborted at its end.
    params = SamplingParams(
        max_tokens=engine.max_request_tokens - input_len, temperature=0, ignore_eos=True
    )
    return [
        engine.submit([rng.randrange(vocab) for _ in range(input_len)], params)
        for _ in range(concurrency)
    ]


def _wait_decoding(engine: Engine, count: int, timeout: float = 600.0) -> None:
    """Until `count` requests run with at least two tokens out (all in decode)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = engine.live_requests()
        if sum(r.state == "decode" and r.generated_tokens >= 2 for r in live) >= count:
            return
        time.sleep(0.05)
    fail(f"the {count} bench requests did not all reach decode in {timeout:.0f} s")


def run_restarts(
    engine: Engine,
    sets: list[dict[str, str]],
    rounds: int,
    concurrency: int,
    input_len: int,
    settle_s: float,
) -> list[dict[str, Any]]:
    handles = _start_load(engine, concurrency, input_len)
    rows: list[dict[str, Any]] = []
    try:
        _wait_decoding(engine, concurrency)
        for round_ in range(rounds):
            for changes in sets:
                result = engine.restart(changes)
                rows.append(
                    {
                        "round": round_,
                        "set": changes,
                        **result.to_dict(),
                        "running": concurrency,
                        "cuda_graph_max_bs": result.config.cuda_graph_max_bs,
                    }
                )
                time.sleep(settle_s)  # decode at the new flags before the next restart
                _wait_decoding(engine, min(concurrency, engine.config.max_running_requests))
    finally:
        for handle in handles:
            handle.abort()
    lost = [h.rid for h in handles if h.result().error]
    if lost:
        fail(f"{len(lost)} request(s) failed across the restarts: {lost[:3]}")
    return rows


def print_table(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="hot restart under load (gap = no token emitted)")
    for col in ("flags", "mode", "graph max bs", "rebuild s", "gap s (median)", "n"):
        table.add_column(col, justify="left" if col in ("flags", "mode") else "right")
    # One line per (flags, resulting mode and graph size): the same --set may land on another
    # max-bs after an earlier restart changed it.
    keys: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{k}={v}" for k, v in row["set"].items())
        keys.setdefault((label, row["mode"], row["cuda_graph_max_bs"]), []).append(row)
    for (label, mode, max_bs), group in keys.items():
        table.add_row(
            label,
            mode + (" (KV kept)" if group[-1]["kv_kept"] else ""),
            str(max_bs or "off"),
            f"{statistics.median(r['rebuild_s'] for r in group):.3f}",
            f"{statistics.median(r['gap_s'] for r in group):.3f}",
            str(len(group)),
        )
    console.print(table)


def register_restart_bench(bench_app: typer.Typer, engine_flags: Any, start_engine: Any) -> None:
    @bench_app.command("restart")
    @engine_flags
    def restart_bench(
        set_: list[str] = SETS,
        rounds: int = typer.Option(2, help="times to cycle through the --set list"),
        concurrency: int = typer.Option(32, help="requests decoding during the restarts"),
        input_len: int = typer.Option(128, help="prompt tokens per request (random ids)"),
        settle: float = typer.Option(1.0, help="seconds of decoding between two restarts"),
        output_file: Path | None = OUTPUT,
        *,
        config: EngineConfig,
    ) -> None:
        """Restart gap and rebuild time for each --set, under a steady decoding load."""
        check_min("--rounds", rounds)
        check_min("--concurrency", concurrency)
        check_min("--input-len", input_len)
        sets = [parse_set(s) for s in set_]
        engine: Engine = start_engine(config)
        try:
            rows = run_restarts(engine, sets, rounds, concurrency, input_len, settle)
        finally:
            engine.shutdown()
        info = {"model": engine.model_name, "device": str(engine.loaded.device), **machine_info()}
        rows = [{**row, **info} for row in rows]
        print_table(rows, Console())
        if output_file is not None:
            append_jsonl(output_file, rows)
            Console(stderr=True).print(f"wrote {json_rows(len(rows))} to {output_file}")
