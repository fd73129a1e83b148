"""Rebuild a transformers config from a GGUF file's metadata.

llama.cpp stores the HF config as `<arch>.*` keys (plus a `rope_freqs` tensor for Llama 3 rope
scaling); the engine needs a real transformers config, so the mapping is inverted here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import UnsupportedModelError

# GGUF architecture -> (HF architecture, transformers config class, Q/K rows permuted by llama.cpp)
GGUF_ARCHS: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", True),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", False),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", False),
}


def read_field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as plain Python, or `default` when the key is absent."""
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _f32(value: Any) -> float:
    """GGUF stores floats as float32; keep the short decimal (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def config_from_gguf(reader: Any, arch: str, tensors: dict[str, Any]) -> Any:
    """Rebuild the transformers config from GGUF metadata (llama.cpp stores it as `<arch>.*`)."""
    import transformers

    def meta(key: str, default: Any = None) -> Any:
        value = read_field(reader, f"{arch}.{key}", default)
        if value is None:
            raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hf_arch, config_cls, _ = GGUF_ARCHS[arch]
    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    head_dim = int(read_field(reader, f"{arch}.attention.key_length") or hidden // heads)
    # The embedding's row count is what the weights need; the token list normally agrees.
    embd = tensors["token_embd.weight"]
    vocab = int(embd.shape[-1])
    return getattr(transformers, config_cls)(
        architectures=[hf_arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_f32(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(meta("context_length", 4096)),
        rope_parameters=_rope_parameters(reader, arch, tensors, head_dim),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=read_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=read_field(reader, "tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )


def _rope_parameters(reader: Any, arch: str, tensors: dict[str, Any], head_dim: int) -> dict:
    theta = _f32(read_field(reader, f"{arch}.rope.freq_base", 10000.0))
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    kind = read_field(reader, f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        params.update(
            rope_type=kind, factor=float(read_field(reader, f"{arch}.rope.scaling.factor"))
        )
        if kind == "yarn":
            orig = read_field(reader, f"{arch}.rope.scaling.original_context_length")
            params["original_max_position_embeddings"] = int(orig)
    elif kind not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {kind!r} is not supported")
    if "rope_freqs.weight" in tensors:
        params = _llama3_rope(theta, dequantize_tensor(tensors["rope_freqs.weight"]), head_dim)
    return params


def _llama3_rope(theta: float, divisors: np.ndarray, head_dim: int) -> dict:
    """Recover HF's llama3 rope parameters from llama.cpp's per-frequency divisor tensor.

    All Llama 3.x releases use low/high factors 1/4 over an 8192 original context, so only the
    factor is unknown; the guess is checked against the stored tensor before it is trusted.
    """
    params = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": float(divisors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if not np.allclose(llama3_rope_divisors(params, head_dim), divisors.ravel(), rtol=1e-3):
        raise UnsupportedModelError("GGUF rope_freqs tensor does not match Llama 3 rope scaling")
    return params


def llama3_rope_divisors(params: dict, head_dim: int) -> np.ndarray:
    """What llama.cpp stores in `rope_freqs`: each base frequency gets divided by this."""
    inv_freq = params["rope_theta"] ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    orig, factor = params["original_max_position_embeddings"], params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """Dequantize a GGUF tensor to float32 in HF layout (GGUF lists dims fastest-first)."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise UnsupportedModelError(
            f"GGUF tensor {tensor.name}: {tensor.tensor_type.name} cannot be dequantized ({exc})"
        ) from exc
    return values.astype(np.float32, copy=False).reshape(shape)
