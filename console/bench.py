"""`llmconsole bench offline|startup`: throughput next to transformers, and cold/warm start time.

A speed figure is only worth its comparison, so every run of `offline` feeds both systems the
same token ids, decodes greedily and makes each request produce exactly `--max-tokens` tokens
(`ignore_eos` for us, `min_new_tokens` for transformers): token counts match, tok/s compares.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmconsole.core.config import EngineConfig

from .prompts import builtin_prompts

if TYPE_CHECKING:
    from llmconsole.core import Engine
    from llmconsole.core.telemetry import Subscription

DATASETS = ("builtin", "random")
WARMUP_TOKENS = 4
TELEMETRY_WAIT_S = 10.0
STARTUP_TIMEOUT_S = 1800.0

# Module-level: ruff (B008) wants no calls in the defaults of a non-scalar parameter.
OFFLINE_OUTPUT = typer.Option(None, help="append one JSON row per measured run (JSONL)")
STARTUP_OUTPUT = typer.Option(None, help="append one JSON row per start (JSONL)")

err = Console(stderr=True)


def _fail(message: str) -> NoReturn:
    from .cli import CliError  # imported late: cli imports this module

    raise CliError(message)


def _check_min(flag: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        _fail(f"{flag} must be >= {minimum}, got {value}")


def machine_info() -> dict[str, Any]:
    """Enough context to tell apart JSONL rows from different machines."""
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):  # other work on a shared machine skews every figure
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _append_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append, so sweeps over flags collect into one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _rows(count: int) -> str:
    return f"{count} JSON row{'' if count == 1 else 's'}"


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks; defined for a single value too."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    # Off when stderr is not a terminal: a log file would only get stray blank lines.
    bar = (*columns, TimeElapsedColumn())
    return Progress(*bar, console=err, transient=True, disable=not err.is_terminal)


# ---- prompts ----------------------------------------------------------------------------------


def build_prompts(
    engine: Engine, dataset: str, num_prompts: int, input_len: int, chat: bool, seed: int
) -> list[list[int]]:
    """Token ids, made once, so every system in the run sees exactly the same input."""
    if dataset == "random":
        # Random ids never include special tokens: a stray EOS/BOS mid-prompt is not a workload.
        vocab = engine.loaded.model_config.vocab_size
        if engine.tokenizer is not None:
            vocab = min(vocab, len(engine.tokenizer))
        special = set(getattr(engine.tokenizer, "all_special_ids", None) or ())
        usable = [t for t in range(vocab) if t not in special]
        rng = random.Random(seed)
        return [[rng.choice(usable) for _ in range(input_len)] for _ in range(num_prompts)]
    if engine.tokenizer is None:
        _fail(f"{engine.model_name} has no tokenizer: use --dataset random")
    texts = builtin_prompts()
    texts = [texts[i % len(texts)] for i in range(num_prompts)]
    if not chat:
        return [engine.tokenize(t) for t in texts]
    if not getattr(engine.tokenizer, "chat_template", None):
        _fail(f"{engine.model_name} has no chat template: pass --no-chat")
    return [engine.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


# ---- measured runs ----------------------------------------------------------------------------


@dataclass
class RunStats:
    system: str  # "llmconsole" | "transformers"
    batch: int  # requests in flight (ours) or generate() batch size (transformers)
    num_prompts: int
    input_tokens: int
    output_tokens: int
    seconds: float
    cached_tokens: int = 0
    ttft_mean_s: float | None = None
    decode_steps: int = 0
    decode_ms_median: float | None = None
    decode_ms_p99: float | None = None
    decode_batch_median: float | None = None

    @property
    def label(self) -> str:
        """Short enough for a table column in an 80-column terminal."""
        if self.system == "llmconsole":
            return f"llmconsole c={self.batch}"
        return f"HF b={self.batch}"

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.seconds

    def row(self, common: dict[str, Any]) -> dict[str, Any]:
        key = "concurrency" if self.system == "llmconsole" else "batch"
        row: dict[str, Any] = {
            "system": self.system,
            key: self.batch,
            "num_prompts": self.num_prompts,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 4),
            "output_tok_s": round(self.output_tok_s, 2),
            "total_tok_s": round(self.total_tok_s, 2),
        }
        if self.system == "llmconsole":
            row |= {
                "cached_tokens": self.cached_tokens,
                "ttft_mean_ms": _ms(self.ttft_mean_s),
                "decode_steps": self.decode_steps,
                "decode_step_ms_median": _round(self.decode_ms_median),
                "decode_step_ms_p99": _round(self.decode_ms_p99),
                "decode_batch_median": self.decode_batch_median,
            }
        return row | common


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class _RunRecords:
    """Gathers one run's telemetry. The engine appends a step's record after handing out its
    tokens, so a run's records are complete only once every token it generated is accounted for;
    waiting for that keeps one run's steps out of the next run's figures."""

    def __init__(self, engine: Engine) -> None:
        self.sub: Subscription = engine.subscribe()
        self.sub.poll()  # the engine is idle: skip its start-up events

    def collect(self, rids: set[str], generated: int) -> tuple[list[Any], list[Any]]:
        from llmconsole.core.telemetry import RequestRecord, StepRecord, of_type

        steps: list[StepRecord] = []
        finished: dict[str, RequestRecord] = {}
        deadline = time.monotonic() + TELEMETRY_WAIT_S
        while True:
            records = self.sub.poll()
            steps += of_type(records, StepRecord)
            finished |= {r.rid: r for r in of_type(records, RequestRecord)}
            complete = sum(s.num_generated for s in steps) >= generated and rids <= finished.keys()
            if complete or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        if not complete or self.sub.dropped:
            err.print("[yellow]warning:[/yellow] telemetry incomplete; step figures may be off")
        return steps, [finished[r] for r in rids if r in finished]


def warm_up(engine: Engine, records: _RunRecords, prompt: list[int]) -> None:
    """One short request first, so one-time costs (allocations, lazy init) stay out of timings."""
    from llmconsole.core import SamplingParams

    params = SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True)
    handle = engine.submit(prompt[:16], params)
    result = handle.result()
    if result.error:
        _fail(f"warm-up request failed: {result.error}")
    records.collect({handle.rid}, len(result.token_ids))


def run_ours(
    engine: Engine,
    records: _RunRecords,
    prompts: list[list[int]],
    max_tokens: int,
    concurrency: int,
) -> RunStats:
    """Closed loop: `concurrency` client threads, each sending its next prompt when one ends."""
    from llmconsole.core import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    concurrency = min(concurrency, len(prompts))
    pending = iter(range(len(prompts)))
    lock = threading.Lock()
    rids: list[str] = []
    usage: list[Any] = []
    failures: list[str] = []

    with _progress() as bar:
        task = bar.add_task(f"llmconsole c={concurrency}", total=len(prompts) * max_tokens)

        def client() -> None:
            while not failures:
                with lock:
                    index = next(pending, None)
                if index is None:
                    return
                try:
                    handle = engine.submit(prompts[index], params)
                except Exception as exc:  # reported by the main thread
                    failures.append(str(exc))
                    return
                with lock:
                    rids.append(handle.rid)
                for delta in handle:
                    bar.advance(task, len(delta.token_ids))
                    if delta.finished:
                        with lock:
                            usage.append(delta.usage)
                        if delta.error:
                            failures.append(delta.error)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started

    if failures:
        _fail(f"a benchmark request failed: {failures[0]}")
    output_tokens = sum(u.completion_tokens for u in usage if u is not None)
    steps, finished = records.collect(set(rids), output_tokens)
    decode = [s for s in steps if s.kind == "decode"]
    ttfts = [r.ttft_s for r in finished if r.ttft_s is not None]
    durations_ms = [s.duration_s * 1000 for s in decode]
    return RunStats(
        system="llmconsole",
        batch=concurrency,
        num_prompts=len(prompts),
        input_tokens=sum(u.prompt_tokens for u in usage if u is not None),
        output_tokens=output_tokens,
        seconds=seconds,
        cached_tokens=sum(u.cached_tokens for u in usage if u is not None),
        ttft_mean_s=statistics.fmean(ttfts) if ttfts else None,
        decode_steps=len(decode),
        decode_ms_median=statistics.median(durations_ms) if decode else None,
        decode_ms_p99=_percentile(durations_ms, 0.99) if decode else None,
        decode_batch_median=statistics.median(s.batch_size for s in decode) if decode else None,
    )


# ---- transformers reference -------------------------------------------------------------------


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence generate()'s warnings about the model's sampling defaults and the loading bar."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # its tqdm bar would fight with ours on stderr
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class HFReference:
    """transformers' own model and generate(), on the engine's device and dtype."""

    def __init__(self, engine: Engine) -> None:
        source = engine.loaded.source
        if source.path is None or source.kind == "dummy":
            _fail("--compare-hf needs real weights on disk (not a dummy model)")
        import torch
        from transformers import AutoModelForCausalLM

        self.device = engine.loaded.device
        with err.status("loading the transformers reference model"), _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=engine.loaded.dtype)
        self.model = model.to(self.device).eval()
        # Padding is masked out, so any id works; prefer the tokenizer's pad, then EOS.
        pad = getattr(engine.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(engine.tokenizer, "eos_token_id", None)
        if pad is None:
            eos = self.model.generation_config.eos_token_id
            pad = eos[0] if isinstance(eos, list) else eos
        self.pad_id = int(pad if pad is not None else 0)
        self._torch = torch

    def _generate(self, group: Sequence[list[int]], new_tokens: int) -> int:
        """Left-padded batch with an attention mask; returns the new tokens per row."""
        torch = self._torch
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, prompt in enumerate(group):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        with torch.inference_mode(), _quiet_transformers():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=self.pad_id,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return int(out.shape[1]) - width

    def run(self, prompts: list[list[int]], max_tokens: int, batch: int) -> RunStats:
        batch = min(batch, len(prompts))
        groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        self._generate(groups[0], 2)  # warm-up at the measured batch size, not timed
        output_tokens = 0
        with _progress() as bar:
            task = bar.add_task(f"transformers b={batch}", total=len(prompts) * max_tokens)
            started = time.perf_counter()
            for group in groups:
                new = self._generate(group, max_tokens)
                if new != max_tokens:
                    _fail(f"transformers generated {new} tokens per row, not {max_tokens}")
                output_tokens += new * len(group)
                bar.advance(task, new * len(group))
            seconds = time.perf_counter() - started
        return RunStats(
            system="transformers",
            batch=batch,
            num_prompts=len(prompts),
            input_tokens=sum(len(p) for p in prompts),
            output_tokens=output_tokens,
            seconds=seconds,
        )


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
        ("output tokens", lambda r: f"{r.output_tokens:,}"),
        ("wall time (s)", lambda r: _fmt(r.seconds, 2)),
        ("output tok/s", lambda r: _fmt(r.output_tok_s)),
        ("total tok/s", lambda r: _fmt(r.total_tok_s)),
        ("decode step p50 (ms)", lambda r: _fmt(r.decode_ms_median, 2)),
        ("decode step p99 (ms)", lambda r: _fmt(r.decode_ms_p99, 2)),
        ("decode batch p50", lambda r: _fmt(r.decode_batch_median)),
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

    def check(self) -> None:
        """Fail before the model loads, so a typo costs no waiting."""
        _check_min("--num-prompts", self.num_prompts)
        _check_min("--concurrency", self.concurrency)
        _check_min("--max-tokens", self.max_tokens)
        _check_min("--input-len", self.input_len)
        _check_min("--hf-batch1-prompts", self.hf_batch1_prompts)
        if self.dataset not in DATASETS:
            _fail(f"--dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}")


def _check_fits(engine: Engine, prompts: list[list[int]], max_tokens: int) -> None:
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > engine.max_request_tokens:
        _fail(
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
        records = _RunRecords(engine)
        warm_up(engine, records, prompts[0])
        main = run_ours(engine, records, prompts, args.max_tokens, args.concurrency)
        runs: list[tuple[str, RunStats]] = [("all prompts", main)]
        pairs: list[tuple[str, RunStats, RunStats]] = []
        if args.compare_hf:
            runs, pairs = _compare_hf(engine, records, prompts, args, main)
    finally:
        engine.shutdown()

    out.print(runs_table(runs))
    if pairs:
        out.print(comparison_table(pairs))
    if args.output_file is not None:
        common = {
            "model": engine.model_name,
            "device": cfg.device,
            "dtype": cfg.dtype,
            "dataset": args.dataset,
            "max_tokens": args.max_tokens,
            "time": time.time(),
            **machine_info(),
        }
        _append_jsonl(args.output_file, [run.row(common) for _, run in runs])
        out.print(f"[dim]{_rows(len(runs))} appended to {args.output_file}[/dim]", highlight=False)


def _compare_hf(
    engine: Engine,
    records: _RunRecords,
    prompts: list[list[int]],
    args: OfflineArgs,
    main: RunStats,
) -> tuple[list[tuple[str, RunStats]], list[tuple[str, RunStats, RunStats]]]:
    """Batch-1 decode (first few prompts, one at a time) and batched (all prompts at batch C)."""
    first = prompts[: args.hf_batch1_prompts]
    k = len(first)
    same_as_main = main.batch == 1 and k == len(prompts)
    ours_b1 = main if same_as_main else run_ours(engine, records, first, args.max_tokens, 1)
    reference = HFReference(engine)
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


# ---- bench startup ----------------------------------------------------------------------------

# Runs in a fresh interpreter: stamps wall-clock times so the parent can split process start ->
# first token into imports, engine build (GGUF conversion included) and the first token.
_STARTUP_SCRIPT = """
import json, sys, time
t_start = time.time()
from pathlib import Path
from llmconsole.core import Engine, EngineConfig, SamplingParams
t_imported = time.time()
cfg = EngineConfig(**json.loads(sys.argv[1]))
converted = None
if cfg.model is None or cfg.model.lower().endswith(".gguf"):
    from llmconsole.core.models.gguf_import import MARKER, cached_folder
    from llmconsole.core.models.source import default_model_path
    gguf = default_model_path() if cfg.model is None else Path(cfg.model).expanduser().resolve()
    converted = not (cached_folder(gguf) / MARKER).is_file()
engine = Engine(cfg)
t_engine = time.time()
handle = engine.submit("Hello", SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
for delta in handle:
    if delta.token_ids or delta.finished:
        break
t_first = time.time()
print(json.dumps({"t_start": t_start, "t_imported": t_imported, "t_engine": t_engine,
                  "t_first_token": t_first, "load_seconds": engine.loaded.load_seconds,
                  "converted": converted, "error": delta.error}), flush=True)
engine.shutdown()
"""


def timed_start(config: EngineConfig, cache_dir: Path | None, label: str) -> dict[str, Any]:
    """One engine start in a new process; seconds from launch to the first streamed token."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["LLMCONSOLE_CACHE_DIR"] = str(cache_dir)
    command = [sys.executable, "-c", _STARTUP_SCRIPT, json.dumps(config.to_dict())]
    with err.status(f"timing: {label}"):
        launched = time.time()
        try:
            proc = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            _fail(f"{label}: no first token within {STARTUP_TIMEOUT_S:.0f}s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        _fail(f"{label}: the engine process failed (exit {proc.returncode}): {detail}")
    stamps = json.loads(lines[-1])
    if stamps["error"]:
        _fail(f"{label}: the first request failed: {stamps['error']}")
    return {
        "phase": label,
        "seconds": stamps["t_first_token"] - launched,
        "interpreter_s": stamps["t_start"] - launched,
        "imports_s": stamps["t_imported"] - stamps["t_start"],
        "engine_s": stamps["t_engine"] - stamps["t_imported"],
        "model_load_s": stamps["load_seconds"],
        "first_token_s": stamps["t_first_token"] - stamps["t_engine"],
        "converted_gguf": stamps["converted"],
    }


def startup_table(results: Sequence[dict[str, Any]]) -> Table:
    table = Table(
        title="engine start, seconds: process launch -> first token", title_justify="left"
    )
    table.add_column("start", no_wrap=True)
    for column in ("total", "python", "imports", "engine", "1st token", "GGUF conv"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in results:
        converted = {True: "yes", False: "no", None: "n/a"}[r["converted_gguf"]]
        table.add_row(
            r["phase"],
            f"[bold]{r['seconds']:.2f}[/bold]",
            f"{r['interpreter_s']:.2f}",
            f"{r['imports_s']:.2f}",
            f"{r['engine_s']:.2f}",
            f"{r['first_token_s']:.3f}",
            converted,
        )
    return table


def bench_startup(config: EngineConfig, fresh_cache: bool, output_file: Path | None) -> None:
    out = Console()
    results: list[dict[str, Any]] = []
    if fresh_cache:
        # The first start converts the GGUF into this private cache; the second reuses it. The
        # user's own cache is never touched, so the cold figure is really cold.
        with tempfile.TemporaryDirectory(prefix="llmconsole-startup-") as tmp:
            results.append(timed_start(config, Path(tmp), "first (empty cache)"))
            results.append(timed_start(config, Path(tmp), "later (cache filled)"))
    else:
        results.append(timed_start(config, None, "warm (existing cache)"))
    out.print(startup_table(results))
    out.print(
        "[dim]python = interpreter start; engine = model resolve/convert + load + KV pool; "
        "1st token = submit -> first streamed token[/dim]"
    )
    if results[0]["converted_gguf"] is None:
        out.print("[dim]note: the model is not a GGUF, so there is no conversion to time[/dim]")
    if output_file is not None:
        common = {"system": "llmconsole", "model": config.model or "default", **machine_info()}
        rows = [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} | common
            for r in results
        ]
        _append_jsonl(output_file, rows)
        out.print(f"[dim]{_rows(len(rows))} appended to {output_file}[/dim]", highlight=False)


# ---- registration -----------------------------------------------------------------------------


def register(
    bench_app: typer.Typer,
    engine_flags: Callable[[Callable[..., Any]], Callable[..., Any]],
    start_engine: Callable[..., Any],
) -> None:
    """Add `offline` and `startup` to the `llmconsole bench` group."""

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

    from .bench_overhead import register_overhead
    from .bench_serve import register_serve

    register_serve(bench_app)
    register_overhead(bench_app, engine_flags, start_engine)
