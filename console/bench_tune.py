"""`llmconsole bench tune-gemm`: measure the skinny GEMM's launch shapes for this card and write
the table the engine reads (kernels/skinny_table.py, kernels/skinny_tune.py).

Batched decode above 64 rows keeps cuBLAS unless the card's table says one of our shapes is
faster for that weight at those rows. This measures it per decode product of a model's shape
(random weights: only the shape matters) and writes only the shapes that won.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from llmconsole.core.models.config import ModelConfig

from .bench_common import check_min, fail

if TYPE_CHECKING:
    from llmconsole.kernels.skinny_tune import Product

TUNE_OUTPUT = typer.Option(
    None, help="table to write (default ./<device name>.json); merged into when it exists"
)


def products_of(mc: ModelConfig) -> tuple[Product, ...]:
    """A model's decode products, as our model merges its weights (qkv, gate_up)."""
    from llmconsole.kernels.skinny_tune import Product

    hidden, inter = mc.hidden_size, mc.intermediate_size
    return (
        Product("qkv", "gemm", mc.q_size + 2 * mc.kv_size, hidden),
        Product("o", "gemm", hidden, mc.q_size),
        Product("gate_up", "gemm", 2 * inter, hidden),
        Product("gate_up+silu", "silu_mul", 2 * inter, hidden),
        Product("down", "gemm", hidden, inter),
        Product("lm_head", "gemm", mc.vocab_size, hidden),
    )


def tune_gemm(model: str, rows: list[int], margin: float, output: Path | None) -> None:
    import torch

    from llmconsole.core.models.source import resolve_model
    from llmconsole.kernels import skinny_gemm as sg
    from llmconsole.kernels.skinny_table import SkinnyTable, TunedEntry, file_name
    from llmconsole.kernels.skinny_tune import count_candidates, row_ranges, tune

    for r in rows:
        check_min("--rows", r, sg.MIN_ROWS)
    if not 0 <= margin < 0.5:
        fail(f"--margin must be in [0, 0.5), got {margin}")
    if not torch.cuda.is_available():
        fail("bench tune-gemm times CUDA kernels: no CUDA GPU here")
    try:
        source = resolve_model(model, "dummy")
        products = products_of(ModelConfig.from_hf(source.config))
    except Exception as e:  # noqa: BLE001 - unknown shape, unsupported architecture: one line
        fail(str(e))
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    path = output or Path.cwd() / file_name(name)
    existing = None
    if path.exists():
        try:
            existing = SkinnyTable.load(path)
        except ValueError as e:
            fail(f"{e}; not overwriting it")
        if existing.device != name:
            fail(f"{path} is {existing.device}'s table; this card is {name}")
    console = Console()
    console.print(
        f"{model}: {len(products)} products at rows {', '.join(str(r) for r in sorted(rows))} "
        f"on {name}, against cuBLAS (keep ours when {margin:.0%} faster)"
    )
    report = Table(title="skinny GEMM vs cuBLAS, µs per call (weights not in L2)")
    for col in ("product", "weight", "rows", "cuBLAS", "ours", "TB/s", "shape", "kept"):
        report.add_column(col, justify="left" if col in ("product", "shape") else "right")
    command = (
        f"llmconsole bench tune-gemm --model {model} --rows {' '.join(map(str, sorted(rows)))} "
        f"--margin {margin}"
    )

    def save(found: list[TunedEntry]) -> SkinnyTable:
        table = SkinnyTable(name, tuple(found), command)
        if existing is not None:
            table = existing.merged(table)
        table.save(path)
        return table

    entries: list[TunedEntry] = []
    ranges = dict((high, (low, high)) for low, high in row_ranges(rows))
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("timing shapes", total=count_candidates(products, rows, device))
        for m, entry in tune(products, rows, device, margin, lambda: bar.advance(task)):
            p, cfg = m.product, m.best
            shape = "-"
            if cfg is not None:
                tile = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}"
                shape = f"{tile} w{cfg.num_warps} s{cfg.num_stages}"
                shape += f" split {cfg.split_k}" if cfg.split_k > 1 else ""
            low, high = ranges[m.rows]
            report.add_row(
                p.name,
                f"{p.n}x{p.k}",
                f"{low}-{high}",
                f"{m.baseline_us:.1f}",
                f"{m.best_us:.1f}" if cfg is not None else "-",
                f"{p.n * p.k * 2 / m.best_us / 1e6:.2f}" if cfg is not None else "-",
                shape,
                "yes" if entry is not None else "no",
            )
            kept = " kept" if entry is not None else ""
            bar.console.print(
                f"{p.name} {p.n}x{p.k} rows {low}-{high}: cuBLAS {m.baseline_us:.1f} µs, "
                f"ours {m.best_us:.1f} µs ({shape}){kept}"
            )
            if entry is not None:
                entries.append(entry)
                save(entries)  # as it goes: a run cut short keeps what it measured
    console.print(report)
    written = save(entries)
    console.print(
        f"wrote {len(written.entries)} entries to {path}. The engine reads it with "
        f"LLMCONSOLE_SKINNY_TUNING={path}; shipped tables live in kernels/configs/skinny_gemm/."
    )


def register_tune(bench_app: typer.Typer) -> None:
    @bench_app.command("tune-gemm", context_settings={"allow_extra_args": True})
    def tune_gemm_command(
        ctx: typer.Context,
        model: str = typer.Option("llama-3-8b", help="shape name or model folder (weights unused)"),
        rows: list[int] = typer.Option(
            [96, 128], "--rows", help="decode batch rows to tune (--rows 96 128)"
        ),
        margin: float = typer.Option(0.03, help="keep our shape only when this much faster"),
        output: Path | None = TUNE_OUTPUT,
    ) -> None:
        """Time the skinny GEMM's launch shapes against cuBLAS on this card, per decode
        product of --model, and write the ones that win as the engine's table for this card."""
        wanted = list(rows)
        for extra in ctx.args:  # `--rows 96 128`: click leaves 128 over
            if not extra.isdigit():
                fail(f"unexpected argument {extra!r}")
            wanted.append(int(extra))
        tune_gemm(model, wanted, margin, output)
