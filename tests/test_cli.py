"""The `llmconsole` script as a user runs it: real subprocesses, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def llmconsole(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "llmconsole.console", *args]
    env = {**os.environ, "COLUMNS": "200"}  # a wide terminal: help rows are not truncated
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_generate_streams_an_answer() -> None:
    out = llmconsole("generate", "--max-tokens", "12", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "generated tokens" in out.stderr


def test_help_lists_every_engine_flag() -> None:
    out = llmconsole("generate", "--help")
    assert out.returncode == 0
    for flag in (
        "--cuda-graph-max-bs",
        "--max-running-requests",
        "--chunked-prefill-size",
        "--speculative-num-draft-tokens",
        "--attention-backend",
        "--mem-fraction-static",
        "--page-size",
    ):
        assert flag in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--attention-backend", "magic"], "--attention-backend"),
        (["--page-size", "0"], "--page-size"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args: list[str], needle: str) -> None:
    out = llmconsole("generate", *args, "hello")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr
