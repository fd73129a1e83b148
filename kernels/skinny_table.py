"""Launch shapes for the skinny GEMM measured on one card: a JSON table per device name.

The hand-picked shapes in kernels/skinny_gemm.py cover 2-64 rows, swept once on an H100 and an
H200. Past that, which shape (if any) beats cuBLAS depends on the card and the weight, so
`llmconsole bench tune-gemm` measures candidates per (product, weight shape, row range) and
keeps only those faster than cuBLAS by a margin (kernels/skinny_tune.py). The engine then reads
the table for its card: `configs/skinny_gemm/<device name>.json` shipped with the package, or the
file `LLMCONSOLE_SKINNY_TUNING` names ("off": none). A product with no entry keeps the built-in
rules. Like SGLang's tuned fused-MoE configs, one file per device name.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OPS = ("gemm", "silu_mul")  # x W^T, and gate_up with SiLU-and-mul in the epilogue
SHIPPED_DIR = Path(__file__).parent / "configs" / "skinny_gemm"
TUNING_ENV = "LLMCONSOLE_SKINNY_TUNING"
FORMAT = 1


@dataclass(frozen=True)
class SkinnyConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1  # K slices summed by a second kernel (narrow W: more programs)


@dataclass(frozen=True)
class TunedEntry:
    """For `op` on an [n, k] weight at min_rows..max_rows rows of x: launch with `config`.
    `us` and `baseline_us` are what the tuner measured at max_rows (ours, cuBLAS's path)."""

    op: str
    n: int
    k: int
    min_rows: int
    max_rows: int
    config: SkinnyConfig
    us: float
    baseline_us: float

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r} (expected one of {', '.join(OPS)})")
        if not 1 <= self.min_rows <= self.max_rows:
            raise ValueError(f"bad row range {self.min_rows}..{self.max_rows}")
        if self.n < 1 or self.k < 1:
            raise ValueError(f"bad weight shape {self.n}x{self.k}")

    def overlaps(self, other: TunedEntry) -> bool:
        """Same op and weight, and some row count in both ranges."""
        return (
            (self.op, self.n, self.k) == (other.op, other.n, other.k)
            and self.min_rows <= other.max_rows
            and other.min_rows <= self.max_rows
        )


@dataclass(frozen=True)
class SkinnyTable:
    device: str  # torch.cuda.get_device_name()
    entries: tuple[TunedEntry, ...]
    command: str = ""  # how it was measured

    def __post_init__(self) -> None:
        index: dict[tuple[str, int, int], list[TunedEntry]] = {}
        for e in self.entries:
            same = index.setdefault((e.op, e.n, e.k), [])
            for other in same:
                if e.overlaps(other):
                    raise ValueError(
                        f"{e.op} {e.n}x{e.k}: rows {e.min_rows}-{e.max_rows} overlap "
                        f"{other.min_rows}-{other.max_rows}"
                    )
            same.append(e)
        object.__setattr__(self, "_index", index)

    def lookup(self, op: str, m: int, n: int, k: int) -> SkinnyConfig | None:
        """The tuned shape for `op` on an [n, k] weight at m rows; None: not tuned (or cuBLAS
        won there)."""
        for e in self._index.get((op, n, k), ()):  # type: ignore[attr-defined]
            if e.min_rows <= m <= e.max_rows:
                return e.config
        return None

    def merged(self, newer: SkinnyTable) -> SkinnyTable:
        """This table with `newer`'s entries replacing the ones they overlap."""
        kept = [e for e in self.entries if not any(e.overlaps(f) for f in newer.entries)]
        return SkinnyTable(newer.device, tuple(kept) + newer.entries, newer.command)

    def to_json(self) -> str:
        body = {
            "format": FORMAT,
            "device": self.device,
            "command": self.command,
            "entries": [asdict(e) for e in self.entries],
        }
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> SkinnyTable:
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT:
                raise ValueError(f"format {body.get('format')!r}, expected {FORMAT}")
            entries = tuple(_entry(e) for e in body["entries"])
            return cls(str(body["device"]), entries, str(body.get("command", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: not a skinny GEMM table: {e}") from None

    @classmethod
    def load(cls, path: Path) -> SkinnyTable:
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"cannot read the skinny GEMM table {path}: {e.strerror}") from None
        return cls.from_json(text, str(path))

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())


def _entry(raw: dict[str, Any]) -> TunedEntry:
    fields = dict(raw)
    fields["config"] = SkinnyConfig(**fields["config"])
    return TunedEntry(**fields)


def file_name(device: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `NVIDIA_H100_80GB_HBM3.json`."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device).strip("_") + ".json"


def table_source(device: str) -> Path | None:
    """The table file the engine reads for `device`: the env's, else the shipped one if any."""
    env = os.environ.get(TUNING_ENV, "")
    if env.lower() == "off":
        return None
    if env:
        return Path(env)
    shipped = SHIPPED_DIR / file_name(device)
    return shipped if shipped.exists() else None


@functools.cache
def table_for(device: str) -> SkinnyTable | None:
    """The table for `device`, read once per process (a bad file raises ValueError)."""
    path = table_source(device)
    return SkinnyTable.load(path) if path is not None else None


@functools.cache
def _device_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def table_on(device: Any) -> SkinnyTable | None:
    """The table for a CUDA torch.device (its card's name)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return table_for(_device_name(index))
