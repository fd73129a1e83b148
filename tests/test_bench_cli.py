"""`llmconsole bench` on the real default model, kept tiny: the figures are not checked, the
accounting is (a wrong token count would make every tok/s figure wrong)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmconsole.console import cli
from llmconsole.console.bench_runs import _percentile
from llmconsole.console.prompts import builtin_prompts


@pytest.fixture(scope="module")
def registered() -> None:
    """`main()` registers the bench commands; in-process tests do it once themselves."""
    if not any(c.name == "offline" for c in cli.bench_app.registered_commands):
        cli._register_bench()


@pytest.fixture(scope="module")
def invoke(registered: None):
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(cli.app, ["bench", *args], env={"COLUMNS": "200"})

    return run


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_counts_exactly_max_tokens_per_request(invoke, tmp_path: Path) -> None:
    out_file = tmp_path / "bench.jsonl"
    args = ("--num-prompts", "4", "--concurrency", "2", "--max-tokens", "4")
    result = invoke("offline", *args, "--output-file", str(out_file))
    assert result.exit_code == 0, result.output
    assert "output tok/s" in result.stdout
    [row] = read_rows(out_file)
    assert row["system"] == "llmconsole"
    assert (row["concurrency"], row["num_prompts"]) == (2, 4)
    assert row["output_tokens"] == 4 * 4  # ignore_eos: nobody stops early
    assert row["input_tokens"] > 4 * 10  # chat-templated builtin prompts
    assert row["seconds"] > 0 and row["output_tok_s"] > 0
    assert row["decode_steps"] >= 3 and row["decode_batch_median"] >= 1
    # Decode read the default model's ~97 MB of blocks per step: a rate, next to the copy rate.
    assert 0 < row["decode_read_gb_per_s"] and 0 < row["copy_gb_per_s"]
    per_step_gb = row["decode_read_gb_per_s"] * row["decode_step_ms_median"] / 1e3
    assert 0.05 < per_step_gb < 0.2, per_step_gb  # medians, not exact: a loose band
    assert "decode reads GB/s (of copy)" in result.stdout
    assert row["cpu_count"] == os.cpu_count() and "torch_version" in row
    # the resolved flags travel with the row (CPU: torch attention, no graphs, no overlap)
    assert (row["attention_backend"], row["overlap_schedule"], row["kv_cache_dtype"]) == (
        "torch",
        "off",
        "auto",
    )
    assert row["cuda_graph_max_bs"] is None and row["page_size"] == 1


def test_compare_hf_rounds_alternate_and_report_a_median(invoke, tmp_path: Path) -> None:
    out_file = tmp_path / "rounds.jsonl"
    args = ("--num-prompts", "1", "--concurrency", "1", "--max-tokens", "2", "--hf-batch1-prompts")
    result = invoke(
        "offline", *args, "1", "--compare-hf", "--rounds", "2", "--output-file", str(out_file)
    )
    assert result.exit_code == 0, result.output
    assert "median ratio" in result.stdout and "over 2 rounds" in result.stdout
    rows = read_rows(out_file)
    systems = [r["system"] for r in rows]
    assert systems.count("llmconsole") == 2 and systems.count("transformers") == 2
    assert all(r["output_tokens"] == 2 for r in rows)  # both sides made exactly the same work


def test_offline_random_dataset(invoke, tmp_path: Path) -> None:
    out_file = tmp_path / "random.jsonl"
    args = ("--dataset", "random", "--input-len", "16", "--num-prompts", "2", "--max-tokens", "2")
    result = invoke("offline", *args, "--output-file", str(out_file))
    assert result.exit_code == 0, result.output
    [row] = read_rows(out_file)
    assert row["input_tokens"] == 2 * 16 and row["output_tokens"] == 2 * 2
    assert row["dataset"] == "random"


def test_bad_value_is_one_line_error_exit_2() -> None:
    cmd = [sys.executable, "-m", "llmconsole.console", "bench", "offline", "--concurrency", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--concurrency" in lines[0], out.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dataset", "sharegpt"], "--dataset"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--hf-batch1-prompts", "0"], "--hf-batch1-prompts"),
    ],
)
def test_bad_values_fail_before_loading(
    registered: None, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    code = cli.run(lambda: cli.app(["bench", "offline", *args], standalone_mode=False))
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0]


def test_builtin_prompts_ship_with_the_package() -> None:
    prompts = builtin_prompts()
    assert len(prompts) >= 60 and len(set(prompts)) == len(prompts)
    assert all(isinstance(p, str) and 10 < len(p) < 400 for p in prompts)


def test_percentile() -> None:
    assert _percentile([5.0], 0.99) == 5.0
    assert _percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert _percentile(list(map(float, range(101))), 0.99) == pytest.approx(99.0)


def test_console_bench_alternates_sides_and_pairs_rounds_by_mode() -> None:
    """Rounds alternate which side goes first; each round's ratio is console over headless
    whatever the order, so a console-first round is not reported inverted."""
    from llmconsole.console.bench_console import round_order, round_pairs, round_ratio

    assert [round_order(i)[0] for i in range(4)] == ["headless", "console"] * 2
    rows = []
    for i, (first_tok_s, second_tok_s) in enumerate([(100.0, 90.0), (90.0, 100.0)]):
        for mode, tok_s in zip(round_order(i), (first_tok_s, second_tok_s), strict=True):
            rows.append({"round": i, "mode": mode, "engine_tok_s": tok_s})
    ratios = [round_ratio(h, c) for h, c in round_pairs(rows)]
    assert ratios == [0.9, 0.9]  # console was the slower side both times
    assert round_ratio({"engine_tok_s": 0.0}, {"engine_tok_s": 5.0}) is None


def test_console_bench_summary_geometric_mean_and_its_error() -> None:
    from llmconsole.console.bench_console import summarize_ratios

    # 0.9 and 1/0.9 cancel in a geometric mean (an arithmetic mean would say 1.006).
    even = summarize_ratios([0.9, 1 / 0.9])
    assert even.geometric_mean == pytest.approx(1.0)
    assert even.low < 1.0 < even.high
    noisy = summarize_ratios([0.9, 1.1, 0.95, 1.05] * 4)
    assert noisy.median == pytest.approx(1.0)
    assert noisy.high - noisy.low < even.high - even.low  # more rounds, a narrower error
    assert math.isnan(summarize_ratios([]).median)
    assert math.isnan(summarize_ratios([0.97]).low)
