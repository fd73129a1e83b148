"""A GGUF checkpoint's projections kept in their 32-weight blocks for CPU decode.

The GGUF converter writes, beside the fp32 `model.safetensors`, the 2-D weights stored as Q4_0,
Q4_1 or Q8_0 as their raw block rows (`BLOCKS_FILE`, HF names, Q/K rows un-permuted like the
fp32 copy). On a CPU with fp32 weights the loader attaches them to the model's projections
(q|k|v and gate|up merged as the fp32 weights are) and to the LM head: a product of up to
`ROWS` rows (decode and small extends) then runs `kernels/cpu_blocks`, which reads ~5x fewer
bytes and multiplies by exactly the same fp32 weight values; prefill keeps `F.linear` on the fp32
copy, which is as fast there (the product is compute-bound).

`LLMCONSOLE_CPU_GGUF_BLOCKS=0` keeps every product on the fp32 weights (A/B runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmconsole.kernels import cpu_blocks

from .llama import MERGED_PARTS, Linear

BLOCKS_FILE = "gguf-blocks/blocks.safetensors"
# Rows (tokens in a product) that take the blocks: measured faster than fp32 (MKL's packed GEMM
# included) from 1 to 64 rows on the 2-core box, level at 128; prefill-sized products keep fp32.
ROWS = range(1, 97)
_ENV = "LLMCONSOLE_CPU_GGUF_BLOCKS"
_GGUF_KINDS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}
log = logging.getLogger("llmconsole")


def gguf_kind(type_name: str) -> str | None:
    """Our kind for a GGUF tensor type name (e.g. "Q4_1"), None where the kernel has none."""
    return _GGUF_KINDS.get(type_name)


def write_blocks(path: Path, rows: dict[str, tuple[str, np.ndarray]]) -> None:
    """Save HF name -> (kind, uint8 [N, row_bytes]) as a safetensors file, kinds in metadata."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(block_rows) for name, (_, block_rows) in rows.items()}
    save_file(tensors, str(path), metadata={name: kind for name, (kind, _) in rows.items()})


@dataclass(frozen=True)
class BlockWeight:
    """y = x W^T (+ b) from W's blocks. Contract: `blocks` dequantize to the fp32 weight the
    module holds, so either path computes the same product."""

    lib: object  # the loaded kernel (ctypes.CDLL)
    kind: str
    blocks: torch.Tensor  # [out, row_bytes] uint8
    bias: torch.Tensor | None  # [out] fp32

    def applies(self, rows: int) -> bool:
        return rows in ROWS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out] fp32
        return cpu_blocks.matmul(self.lib, x, self.blocks, self.kind, self.bias)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Target:
    name: str  # the HF weight it stands for
    weight: torch.Tensor  # [out, in] fp32: the module's copy
    bias: torch.Tensor | None
    install: Callable[[BlockWeight], None]


def kernel() -> object | None:
    """The compiled blocks kernel (built into the cache folder on first use), or None."""
    from ..cpu_kernels import library

    return library()


def attach(model: nn.Module, folder: Path) -> dict[str, int]:
    """Give `model`'s projections and LM head their blocks from `folder`'s BLOCKS_FILE.

    Returns how many weights took blocks, by kind ({} when there is no file, the switch is off
    or the kernel cannot be built; the model then runs on its fp32 weights as before)."""
    path = folder / BLOCKS_FILE
    if os.environ.get(_ENV, "1") == "0" or not path.is_file():
        return {}
    lib = kernel()
    if lib is None:
        log.warning("GGUF blocks not used: %s", cpu_blocks.unavailable_reason())
        return {}
    stored = dict(_read(path))
    counts: dict[str, int] = {}
    for target in _targets(model):
        found = _blocks_for(target.name, stored)
        if found is None:
            continue
        kind, blocks = found
        out_features, in_features = target.weight.shape
        if blocks.shape != (out_features, cpu_blocks.row_bytes(kind, in_features)):
            raise ValueError(f"{path}: blocks of {target.name} have shape {tuple(blocks.shape)}")
        target.install(BlockWeight(lib, kind, blocks, target.bias))
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _targets(model: nn.Module) -> Iterator[_Target]:
    """Every projection of `model` (our Llama-family model) and its LM head."""

    def installer(module: nn.Module, attr: str) -> Callable[[BlockWeight], None]:
        return lambda blocks: setattr(module, attr, blocks)

    for name, module in model.named_modules():
        if isinstance(module, Linear) and name != "lm_head":  # the head goes through the model
            hf_name = f"model.{name}.weight"
            yield _Target(hf_name, module.weight, module.bias, installer(module, "blocks"))
    tied = model.config.tie_word_embeddings  # type: ignore[union-attr]
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    yield _Target(name, model.lm_head_weight, None, installer(model, "lm_head_blocks"))  # type: ignore[arg-type]


def _blocks_for(
    name: str, stored: dict[str, tuple[str, torch.Tensor]]
) -> tuple[str, torch.Tensor] | None:
    """A weight's blocks; a merged projection's parts concatenated by rows, in merge order,
    when every part is stored and all share one kind."""
    prefix, _, rest = name.rpartition(".")  # "...self_attn.qkv_proj", "weight"
    owner, _, proj = prefix.rpartition(".")
    if proj not in MERGED_PARTS:
        return stored.get(name)
    parts = [stored.get(f"{owner}.{p}.{rest}") for p in MERGED_PARTS[proj]]
    if any(p is None for p in parts) or len({p[0] for p in parts if p}) != 1:
        return None
    return parts[0][0], torch.cat([p[1] for p in parts if p])  # type: ignore[index]


def _read(path: Path) -> Iterator[tuple[str, tuple[str, torch.Tensor]]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        kinds = f.metadata() or {}
        for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
            kind = kinds.get(name)
            if kind in cpu_blocks.KINDS:
                yield name, (kind, f.get_tensor(name))
