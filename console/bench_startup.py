"""`llmconsole bench startup`: process launch -> first streamed token, each start in a fresh
Python process, split into interpreter, imports, engine build and the first token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llmconsole.core.config import EngineConfig

from .bench_common import append_jsonl, err, fail, json_rows, machine_info

STARTUP_TIMEOUT_S = 1800.0

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
            fail(f"{label}: no first token within {STARTUP_TIMEOUT_S:.0f}s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"{label}: the engine process failed (exit {proc.returncode}): {detail}")
    stamps = json.loads(lines[-1])
    if stamps["error"]:
        fail(f"{label}: the first request failed: {stamps['error']}")
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
        append_jsonl(output_file, rows)
        out.print(f"[dim]{json_rows(len(rows))} appended to {output_file}[/dim]", highlight=False)
