"""The console as a user starts it: the real `llmconsole` binary (a tmux smoke test), replay
and export of the committed recording, and one-line errors for bad input."""

from __future__ import annotations

import csv
import datetime as dt
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import llmconsole

RECORDING = Path(__file__).parent.parent / "recordings" / "smollm2-cpu-load.jsonl"


def test_export_turns_a_recording_into_csvs_pandas_can_read(tmp_path: Path) -> None:
    out = llmconsole("export", str(RECORDING), "--out", str(tmp_path / "csv"), timeout=120)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "csv"
    with open(folder / "steps.csv", newline="") as fh:
        steps = list(csv.DictReader(fh))
    with open(folder / "requests.csv", newline="") as fh:
        requests = list(csv.DictReader(fh))
    with open(folder / "events.csv", newline="") as fh:
        events = list(csv.DictReader(fh))
    assert f"{len(steps)} rows in steps.csv" in out.stdout
    assert len(requests) >= 40 and {"start", "load", "export"} <= {e["kind"] for e in events}
    for row in steps[:5]:
        assert dt.datetime.fromisoformat(row["time"]).tzinfo is not None
        assert row["cuda_graph"] in ("True", "False") and int(row["batch_size"]) >= 1
    # The recording predates the prefix-cache columns: they are there, zero-filled.
    assert all(
        (row["kv_pages_cached"], row["cached_tokens"], row["admitted_tokens"]) == ("0", "0", "0")
        for row in steps
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["replay", "/no/such/file.jsonl"], "no recording at /no/such/file.jsonl"),
        (["replay", str(RECORDING), "--speed", "0"], "--speed"),
        (["replay", str(RECORDING), "--theme", "neon"], "unknown theme 'neon'"),
        (["export", __file__], "not an llmconsole recording"),
        (["--theme", "neon"], "unknown theme 'neon'"),
        (["--load-concurrency", "0"], "--load-concurrency must be >= 1"),
    ],
)
def test_bad_console_input_is_one_line(args: list[str], needle: str) -> None:
    out = llmconsole(*args, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr


def test_a_busy_port_fails_before_the_console_opens() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        out = llmconsole("--port", str(port), timeout=120)
    assert out.returncode == 2 and f"127.0.0.1:{port}" in out.stderr
    assert time.monotonic() - started < 30  # no model load before the error


def _pane(session: str) -> str:
    return subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
    ).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_real_binary_in_tmux_serves_runs_a_load_and_quits(tmp_path: Path) -> None:
    session = f"llmconsole-test-{time.monotonic_ns()}"
    record = tmp_path / "session.jsonl"
    status = tmp_path / "status"
    cmd = (
        f"{sys.executable} -m llmconsole.console --port 0 --record {record} "
        f"--export-dir {tmp_path} --load-requests 6 --load-concurrency 3 --load-max-tokens 8; "
        f"echo $? > {status}"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", cmd], check=True
    )
    try:
        deadline = time.monotonic() + 120
        while "serving" not in _pane(session):
            assert time.monotonic() < deadline, _pane(session)
            time.sleep(0.5)
        assert "SmolLM2-135M-Instruct" in _pane(session)
        subprocess.run(["tmux", "send-keys", "-t", session, "l"], check=True)
        time.sleep(1.0)
        assert "Built-in load" in _pane(session)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        deadline = time.monotonic() + 180
        while "load finished" not in _pane(session):
            assert time.monotonic() < deadline, _pane(session)
            time.sleep(0.5)
        assert "6 ok, 0 failed" in _pane(session)
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        deadline = time.monotonic() + 60
        while not status.exists():
            assert time.monotonic() < deadline, _pane(session)
            time.sleep(0.2)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    lines = record.read_text().splitlines()
    assert '"type":"session"' in lines[0] and any('"kind":"shutdown"' in x for x in lines)
