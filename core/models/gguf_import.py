"""Convert a GGUF file once into a cached Hugging Face-style folder.

The engine's model reads HF-named safetensors, so a GGUF is dequantized (to float32) and cached
under `<cache>/gguf/<stem>-<hash>/`; its Q4_0 / Q4_1 / Q8_0 weights are also kept there as raw
blocks (gguf_blocks.BLOCKS_FILE), which CPU decode reads instead of the fp32 copy. Later runs
find the folder by the file's size and mtime and never parse the GGUF again (parsing plus
tokenizer conversion takes ~10 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnsupportedModelError
from .gguf_blocks import BLOCKS_FILE, gguf_kind, write_blocks
from .gguf_config import GGUF_ARCHS, config_from_gguf, dequantize_tensor, read_field
from .safetensors_stream import LazyTensor, write_float32_safetensors

Progress = Callable[[str, float], None]

# Bump when the folder layout or tensor maths change, so stale conversions are not reused.
CONVERTER_VERSION = 2  # 2: the quantized projections' blocks kept too (gguf_blocks)
MARKER = "llmconsole-gguf.json"

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Tensors llama.cpp adds that have no HF weight; they are folded into the config instead.
_CONFIG_ONLY = {"rope_freqs.weight"}


def cache_root() -> Path:
    """Where converted models live; `LLMCONSOLE_CACHE_DIR` overrides it (tests, shared disks)."""
    env = os.environ.get("LLMCONSOLE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("llmconsole"))


def cached_folder(gguf_path: Path) -> Path:
    """The folder a GGUF converts to; keyed on size+mtime so an edited file converts again."""
    st = gguf_path.stat()
    key = f"{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{digest}"


def ensure_converted(gguf_path: Path, progress: Progress | None = None) -> Path:
    """Return the HF folder for `gguf_path`, converting first only if no finished one exists."""
    final = cached_folder(gguf_path)
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    # Build in a private temp dir and rename it into place: readers never see a half folder,
    # and an interrupted run leaves only a `.tmp-*` dir that is never mistaken for a result.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        convert_gguf(gguf_path, tmp, progress or (lambda stage, fraction: None))
        if final.exists() and not (final / MARKER).is_file():
            shutil.rmtree(final)  # leftover without a marker: not ours to trust
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():
                raise
            # Another process finished the same conversion first; its folder is equivalent.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_temps(final: Path, max_idle_s: float = 3600.0) -> None:
    """Delete temp dirs of killed conversions (each can be GBs); live ones keep writing."""
    for tmp in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            newest = max(p.stat().st_mtime for p in [tmp, *tmp.iterdir()])
        except OSError:
            continue  # vanished meanwhile: its owner finished or cleaned up
        if time.time() - newest > max_idle_s:
            shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf_path: Path, out: Path, progress: Progress) -> None:
    """Write config, tokenizer and float32 `model.safetensors` for `gguf_path` into `out`."""
    import gguf

    progress("reading GGUF", 0.0)
    reader = gguf.GGUFReader(gguf_path)
    arch = str(read_field(reader, "general.architecture"))
    if arch not in GGUF_ARCHS:
        supported = ", ".join(sorted(GGUF_ARCHS))
        raise UnsupportedModelError(
            f"{gguf_path.name}: GGUF architecture {arch!r} is not supported "
            f"(supported GGUF architectures: {supported})"
        )
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(reader, arch, tensors)
    config.save_pretrained(out)
    _save_generation_config(config, out)

    if read_field(reader, "tokenizer.ggml.model") is not None:
        progress("converting tokenizer", 0.1)
        _save_tokenizer(gguf_path, out)

    progress("dequantizing weights", 0.5)
    entries = _weight_entries(tensors, config, permute_qk=GGUF_ARCHS[arch][2])
    n = len(entries)
    write_float32_safetensors(
        out / "model.safetensors",
        entries,
        lambda i: progress("dequantizing weights", 0.5 + 0.49 * (i + 1) / n),
    )
    progress("keeping quantized blocks", 0.99)
    write_blocks(out / BLOCKS_FILE, _block_rows(tensors, config, permute_qk=GGUF_ARCHS[arch][2]))
    st = gguf_path.stat()
    marker = {
        "source": str(gguf_path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "converter_version": CONVERTER_VERSION,
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    progress("done", 1.0)


def hf_tensor_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to its HF name, or None when there is no HF counterpart."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _PER_LAYER:
        return f"model.layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}.{suffix}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (HF rotate-half layout -> interleaved pairs).

    llama.cpp's converter reorders each head's rows from [first half | second half] to
    [pair0, pair1, ...] for its rope kernel; here each head's rows go back.
    """
    head_dim = w.shape[0] // n_head
    rest = w.shape[1:]
    return w.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _hf_rows(gguf_name: str, rows: np.ndarray, config: Any, permute_qk: bool) -> np.ndarray:
    """A weight's rows (fp32 values or raw blocks) in HF order: llama.cpp permutes Q's and K's."""
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    n_head = heads.get(gguf_name.split(".")[-2]) if permute_qk else None
    return unpermute_rope_rows(rows, n_head) if n_head else rows


def _weight_entries(tensors: dict[str, Any], config: Any, permute_qk: bool) -> list[LazyTensor]:
    """Name, HF shape and a lazy loader per tensor, so only one is dequantized at a time."""
    entries: list[LazyTensor] = []
    for gguf_name, tensor in tensors.items():
        name = hf_tensor_name(gguf_name)
        if name is None:
            if gguf_name in _CONFIG_ONLY:
                continue
            raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no known HF counterpart")

        def load(t: Any = tensor, n: str = gguf_name) -> np.ndarray:
            return _hf_rows(n, dequantize_tensor(t), config, permute_qk)

        shape = tuple(int(d) for d in reversed(tensor.shape))
        entries.append((name, shape, load))
    return entries


def _block_rows(
    tensors: dict[str, Any], config: Any, permute_qk: bool
) -> dict[str, tuple[str, np.ndarray]]:
    """HF name -> (kind, raw block rows [N, row_bytes]) for every 2-D weight in a block type the
    CPU kernel reads; Q/K rows un-permuted exactly as their fp32 copies are."""
    rows: dict[str, tuple[str, np.ndarray]] = {}
    for gguf_name, tensor in tensors.items():
        kind = gguf_kind(tensor.tensor_type.name)
        name = hf_tensor_name(gguf_name)
        if kind is None or name is None or len(tensor.shape) != 2:
            continue
        data = np.asarray(tensor.data)  # [N, row_bytes] uint8
        rows[name] = (kind, _hf_rows(gguf_name, data, config, permute_qk))
    return rows


def _save_generation_config(config: Any, out: Path) -> None:
    from transformers import GenerationConfig

    ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(out)


def _save_tokenizer(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many types for unsupported tokenizers
        raise UnsupportedModelError(
            f"{gguf_path.name}: could not convert its tokenizer ({exc})"
        ) from exc
    tok.save_pretrained(out)
