"""Write a safetensors file one tensor at a time.

`safetensors.save_file` needs every tensor in memory at once; converting a large GGUF to
float32 would then need the whole dequantized model in RAM. The format's header needs only
names and shapes, so it is written first and each tensor is produced, written and dropped.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# (name, shape, loader): the loader is called only when that tensor's bytes are written.
LazyTensor = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def write_float32_safetensors(
    path: Path,
    tensors: Sequence[LazyTensor],
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """Stream float32 tensors into `path`; `on_tensor(i)` runs after tensor i is written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        nbytes = 4 * math.prod(shape)
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned for mmap readers
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (name, shape, load) in enumerate(tensors):
            arr = np.ascontiguousarray(load(), dtype="<f4")
            if arr.shape != shape:
                raise ValueError(f"{name}: loader gave shape {arr.shape}, header says {shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            if on_tensor is not None:
                on_tensor(i)
