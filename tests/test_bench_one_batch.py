"""`llmconsole bench one-batch` on CPU with a tiny random model: the figures are not checked,
the accounting and the CUDA-graph reporting are."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from llmconsole.console import cli


def test_one_batch_reports_prefill_and_eager_decode_per_batch_size(tmp_path: Path) -> None:
    if not any(c.name == "one-batch" for c in cli.bench_app.registered_commands):
        cli._register_bench()
    out_file = tmp_path / "one-batch.jsonl"
    args = ["bench", "one-batch", "--model", "tiny-llama", "--load-format", "dummy"]
    args += ["--batch-size", "1", "3", "--input-len", "20", "--output-len", "3"]
    result = CliRunner().invoke(
        cli.app, [*args, "--output-file", str(out_file)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "prefill tok/s" in result.stdout and "eager tok/s" in result.stdout
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [1, 3]
    for row in rows:
        assert (row["input_len"], row["output_len"]) == (20, 3)
        assert row["prefill_s"] > 0 and row["eager_step_ms"] > 0
        expected = row["batch_size"] * 20 / row["prefill_s"]
        assert abs(row["prefill_tok_s"] - expected) < 1e-6 * expected
        assert abs(row["eager_tok_s"] * row["eager_step_ms"] / 1e3 - row["batch_size"]) < 1e-6
        # The host's part of a step is timed within the step: queueing it cannot take longer.
        assert 0 < row["eager_launch_ms"] <= row["eager_step_ms"]
        # CPU: no graphs, and the row says so rather than inventing a figure.
        assert row["graph_step_ms"] is None and row["cuda_graph"] is False
        assert row["graph_launch_ms"] is None
        assert row["attention_backend"] == "torch" and row["model"] == "tiny-llama"
        assert row["copy_gb_per_s"] > 0.1
    # What a decode step reads, from tiny-llama's shape (fp32): hidden 64, intermediate 128,
    # 2 layers, 4 query / 2 KV heads of 16, vocabulary 512. Weights: per layer qkv 64x128,
    # o 64x64, gate_up 64x256, down 128x64 and two norms, then the final norm and the LM head;
    # one embedding row per request. KV: 2 layers x K and V x 2 heads x 16 floats a position;
    # the timed steps end at positions 21, 22, 23 (median 22) after a 20-token prompt.
    weights = 2 * (64 * 128 + 64 * 64 + 64 * 256 + 128 * 64 + 2 * 64) + 64 + 512 * 64
    kv_position = 2 * 2 * 2 * 16
    for row in rows:
        bs = row["batch_size"]
        assert row["decode_bytes"] == 4 * (weights + bs * 64 + bs * 22 * kv_position)
    words = " ".join(result.stdout.split())
    assert "read GB/s" in words and "memory copy rate" in words
    assert "(host " in words and "on a CPU includes the step's compute" in words


def test_one_batch_rejects_a_batch_that_cannot_fit(tmp_path: Path) -> None:
    if not any(c.name == "one-batch" for c in cli.bench_app.registered_commands):
        cli._register_bench()
    args = ["bench", "one-batch", "--model", "tiny-llama", "--load-format", "dummy"]
    args += ["--batch-size", "2", "--input-len", "4000", "--output-len", "2"]
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code != 0
    assert "tokens per request" in str(result.exception) + result.output


def test_one_batch_warms_up_the_many_request_kernels_before_timing() -> None:
    from llmconsole.console.bench_one_batch import warmup_sizes

    # A batch-1 warm-up alone would leave Triton's many-request variants to compile inside
    # the first timed prefill of a larger batch.
    assert warmup_sizes([1, 64, 128]) == [1, 2]
    assert warmup_sizes([64, 1]) == [1, 2]
    assert warmup_sizes([1]) == [1]
    assert warmup_sizes([8, 32]) == [8]
