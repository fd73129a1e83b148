"""Stream a folder's safetensors weights as (HF name, tensor) pairs.

Shards are opened one at a time and tensors read one by one from the memory map, so loading
never holds a second full copy of the model in host memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .source import ModelSource


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards if sharded, else every file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of a "folder" source under its HF name, shard by shard."""
    if source.kind != "folder" or source.path is None:
        raise ValueError(f"{source.name}: {source.kind} sources have no weight files")
    from safetensors import safe_open

    for file in weight_files(source.path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield name, f.get_tensor(name)
