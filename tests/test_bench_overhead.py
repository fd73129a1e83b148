from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def test_api_overhead_runs_both_paths_on_the_same_work(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    cmd = [
        sys.executable, "-m", "llmconsole.console", "bench", "api-overhead",
        "--num-prompts", "4", "--concurrency", "2", "--max-tokens", "4", "--output-file", str(out),
        "--rounds", "2",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stderr
    assert "HTTP / offline output tok/s" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]  # both paths ran twice, alternating
    for row in rows:
        assert row["http_output_tok_s"] > 0 and row["offline_output_tok_s"] > 0
        expected = row["http_output_tok_s"] / row["offline_output_tok_s"]
        assert abs(row["ratio"] - expected) < 1e-3 * expected
    ratios = sorted(row["ratio"] for row in rows)
    assert abs(rows[0]["median_ratio"] - (ratios[0] + ratios[1]) / 2) < 1e-3
    # the printed median (3 places) is the file's (4 places), each rounded from the same value
    printed = re.search(r"HTTP / offline output tok/s: ([0-9.]+)", done.stdout)
    assert printed is not None
    assert abs(float(printed.group(1)) - rows[0]["median_ratio"]) <= 0.00055
