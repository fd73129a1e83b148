"""`llmconsole bench offline`: throughput of our engine next to transformers, as tables and JSONL.

A speed figure is only worth its comparison, so every run of `offline` feeds both systems the
same token ids, decodes greedily and makes each request produce exactly `--max-tokens` tokens
(`ignore_eos` for us, `min_new_tokens` for transformers): token counts match, tok/s compares.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from llmconsole.core.config import EngineConfig

from .bench_common import append_jsonl, check_min, fail, json_rows, machine_info, read_cell
from .bench_hf import HFReference
from .bench_runs import RunRecords, RunStats, build_prompts, run_ours, warm_up

ROW_FLAGS = (
    "attention_backend",
    "cuda_graph_max_bs",
    "disable_cuda_graph",
    "overlap_schedule",
    "kv_cache_dtype",
    "page_size",
    "max_running_requests",
    "chunked_prefill_size",
    "speculative_algorithm",
)

if TYPE_CHECKING:
    from llmconsole.core import Engine

DATASETS = ("builtin", "random")


# ---- reports ----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def runs_table(runs: Sequence[tuple[str, RunStats]]) -> Table:
    """Metrics as rows and runs as columns: stays readable in an 80-column terminal."""
    table = Table(
        title="offline throughput (c: requests in flight; HF: transformers generate(), b: batch)",
        title_justify="left",
    )
    table.add_column("metric", no_wrap=True)
    for name, run in runs:
        table.add_column(f"{run.label}\n{name}", justify="right")
    metrics: list[tuple[str, Callable[[RunStats], str]]] = [
        ("requests", lambda r: str(r.num_prompts)),
        ("input tokens", lambda r: f"{r.input_tokens:,}"),
        # prompt tokens read from the prefix cache (transformers computes every one)
        ("cached tokens", lambda r: f"{r.cached_tokens:,}" if r.system == "llmconsole" else "-"),
        ("output tokens", lambda r: f"{r.output_tokens:,}"),
        ("wall time (s)", lambda r: _fmt(r.seconds, 2)),
        ("output tok/s", lambda r: _fmt(r.output_tok_s)),
        ("total tok/s", lambda r: _fmt(r.total_tok_s)),
        ("decode step p50 (ms)", lambda r: _fmt(r.decode_ms_median, 2)),
        ("decode step p99 (ms)", lambda r: _fmt(r.decode_ms_p99, 2)),
        ("decode batch p50", lambda r: _fmt(r.decode_batch_median)),
        ("decode reads GB/s (of copy)", lambda r: read_cell(r.decode_read_gb_s, r.copy_gb_s)),
        ("mean TTFT (ms)", lambda r: _fmt(None if r.ttft_mean_s is None else r.ttft_mean_s * 1e3)),
    ]
    for metric, cell in metrics:
        table.add_row(metric, *(cell(run) for _, run in runs))
    return table


def comparison_table(pairs: Sequence[tuple[str, RunStats, RunStats]]) -> Table:
    table = Table(title="llmconsole vs transformers (output tok/s)", title_justify="left")
    for column in ("setting", "prompts", "llmconsole", "transformers", "ratio"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for setting, ours, ref in pairs:
        ratio = ours.output_tok_s / ref.output_tok_s
        table.add_row(
            setting,
            str(ours.num_prompts),
            _fmt(ours.output_tok_s),
            _fmt(ref.output_tok_s),
            f"[bold]{ratio:.2f}x[/bold]",
        )
    return table


# ---- bench offline ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineArgs:
    num_prompts: int
    concurrency: int
    max_tokens: int
    dataset: str
    input_len: int
    chat: bool
    compare_hf: bool
    hf_batch1_prompts: int
    output_file: Path | None
    rounds: int = 1  # alternate ours / transformers this many times; report the median ratio

    def check(self) -> None:
        """Fail before the model loads, so a typo costs no waiting."""
        check_min("--num-prompts", self.num_prompts)
        check_min("--concurrency", self.concurrency)
        check_min("--max-tokens", self.max_tokens)
        check_min("--input-len", self.input_len)
        check_min("--hf-batch1-prompts", self.hf_batch1_prompts)
        check_min("--rounds", self.rounds)
        if self.dataset not in DATASETS:
            fail(f"--dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}")


def median_ratios(pairs: list[tuple[str, RunStats, RunStats]]) -> str:
    """One line per setting: the median of the per-round ratios, with their range."""
    by_setting: dict[str, list[float]] = {}
    for label, ours, ref in pairs:
        by_setting.setdefault(label, []).append(ours.output_tok_s / ref.output_tok_s)
    lines = []
    for label, ratios in by_setting.items():
        ratios.sort()
        median = statistics.median(ratios)
        lines.append(
            f"{label}: median ratio {median:.2f}x over {len(ratios)} rounds "
            f"(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)"
        )
    return "\n".join(lines)


def _check_fits(engine: Engine, prompts: list[list[int]], max_tokens: int) -> None:
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > engine.max_request_tokens:
        fail(
            f"the longest prompt ({longest} tokens) + --max-tokens {max_tokens} exceeds this "
            f"engine's limit of {engine.max_request_tokens} tokens per request"
        )


def bench_offline(
    args: OfflineArgs, config: EngineConfig, start_engine: Callable[..., Any]
) -> None:
    args.check()
    out = Console()
    engine = start_engine(config)
    try:
        cfg = engine.config
        prompts = build_prompts(
            engine, args.dataset, args.num_prompts, args.input_len, args.chat, cfg.seed
        )
        _check_fits(engine, prompts, args.max_tokens)
        out.print(
            f"[bold]{engine.model_name}[/bold] on {cfg.device} ({cfg.dtype}), "
            f"{args.num_prompts} {args.dataset} prompts x {args.max_tokens} tokens, "
            f"{machine_info()['torch_threads']} torch threads, model load "
            f"{engine.loaded.load_seconds:.1f}s",
            highlight=False,
        )
        if args.concurrency > cfg.max_running_requests:
            out.print(
                f"[dim]note: --concurrency {args.concurrency} > --max-running-requests "
                f"{cfg.max_running_requests}; the engine queues the rest[/dim]"
            )
        records = RunRecords(engine)
        warm_up(engine, records, prompts[0])
        main = run_ours(engine, records, prompts, args.max_tokens, args.concurrency)
        runs: list[tuple[str, RunStats]] = [("all prompts", main)]
        pairs: list[tuple[str, RunStats, RunStats]] = []
        if args.compare_hf:
            reference = HFReference(engine)
            runs, pairs = _compare_hf(engine, records, prompts, args, main, reference)
            for _ in range(args.rounds - 1):  # interleaved, so slow spells hit both sides
                again = run_ours(engine, records, prompts, args.max_tokens, args.concurrency)
                more_runs, more_pairs = _compare_hf(
                    engine, records, prompts, args, again, reference
                )
                runs += more_runs
                pairs += more_pairs
    finally:
        engine.shutdown()

    out.print(runs_table(runs[:4]))
    if pairs:
        out.print(comparison_table(pairs))
    if args.rounds > 1 and pairs:
        out.print(median_ratios(pairs))
    if args.output_file is not None:
        common = {
            "model": engine.model_name,
            "device": cfg.device,
            "dtype": cfg.dtype,
            # The resolved flags that shape a decode step, so rows from runs with different
            # flags (e.g. --overlap-schedule on / off) tell themselves apart.
            **{name: getattr(cfg, name) for name in ROW_FLAGS},
            "dataset": args.dataset,
            "max_tokens": args.max_tokens,
            "time": time.time(),
            **machine_info(),
        }
        append_jsonl(args.output_file, [run.row(common) for _, run in runs])
        out.print(
            f"[dim]{json_rows(len(runs))} appended to {args.output_file}[/dim]", highlight=False
        )


def _compare_hf(
    engine: Engine,
    records: RunRecords,
    prompts: list[list[int]],
    args: OfflineArgs,
    main: RunStats,
    reference: HFReference,
) -> tuple[list[tuple[str, RunStats]], list[tuple[str, RunStats, RunStats]]]:
    """Batch-1 decode (first few prompts, one at a time) and batched (all prompts at batch C)."""
    first = prompts[: args.hf_batch1_prompts]
    k = len(first)
    same_as_main = main.batch == 1 and k == len(prompts)
    ours_b1 = main if same_as_main else run_ours(engine, records, first, args.max_tokens, 1)
    ref_b1 = reference.run(first, args.max_tokens, 1)
    ref_bc = ref_b1 if same_as_main else reference.run(prompts, args.max_tokens, main.batch)
    runs = [("all prompts", main)]
    if not same_as_main:
        runs.append((f"first {k}", ours_b1))
    runs.append((f"first {k}", ref_b1))
    if not same_as_main:
        runs.append(("all prompts", ref_bc))
    pairs = [(f"batch 1, first {k}", ours_b1, ref_b1)]
    if not same_as_main:
        pairs.append((f"batch {main.batch}, all", main, ref_bc))
    return runs, pairs
