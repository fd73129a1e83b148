"""`llmconsole serve` as a process: it serves, a busy port is one line, Ctrl-C ends in-flight
streams with a final chunk instead of a dropped connection."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "llmconsole.console", "serve", "--port", str(port)]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _wait_healthy(url: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def test_ctrl_c_finishes_streams_with_a_final_chunk() -> None:
    port = _free_port()
    proc = _serve(port)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        # A busy port: a second server fails at once with one line.
        busy = subprocess.run(
            [sys.executable, "-m", "llmconsole.console", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert busy.returncode == 2 and "Traceback" not in busy.stderr
        lines = [ln for ln in busy.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(port) in lines[0]

        body = {"prompt": "Count:", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        payloads = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                payloads.append(line[6:])
                if len(payloads) == 3:
                    proc.send_signal(signal.SIGINT)
        assert payloads[-1] == "[DONE]"
        last = json.loads(payloads[-2])
        assert last["choices"][0]["finish_reason"] == "error"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
