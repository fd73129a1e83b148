"""Helpers every `llmconsole bench` command shares: errors, machine context, JSONL, progress."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    from .cli import CliError  # imported late: cli imports the bench modules and the engine

    raise CliError(message)


def check_min(flag: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        fail(f"{flag} must be >= {minimum}, got {value}")


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


def append_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append, so sweeps over flags collect into one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def json_rows(count: int) -> str:
    """'1 JSON row', '3 JSON rows'."""
    return f"{count} JSON row{'' if count == 1 else 's'}"


def read_cell(read_gb_s: float | None, copy_gb_s: float | None) -> str:
    """A decode read rate in GB/s and, in brackets, its share of the copy rate: '2,620 (87%)'."""
    if read_gb_s is None:
        return "-"
    text = f"{read_gb_s:,.0f}" if read_gb_s >= 100 else f"{read_gb_s:.1f}"
    return text + (f" ({read_gb_s / copy_gb_s:.0%})" if copy_gb_s else "")


def progress_bar() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    # Off when stderr is not a terminal: a log file would only get stray blank lines.
    bar = (*columns, TimeElapsedColumn())
    return Progress(*bar, console=err, transient=True, disable=not err.is_terminal)
