"""Named model shapes for `load_format="dummy"`: real dimensions, random weights, no files.

They let the engine be sized and benchmarked (KV-cache fit, kernel shapes, throughput) for
models that are not on this machine. Dims follow the public config.json of each model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_LLAMA3 = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    bos_token_id=128000,
    eos_token_id=128001,
)
_QWEN_COMMON = dict(rms_norm_eps=1e-6, bos_token_id=151643, tie_word_embeddings=False)


def _llama(**kw: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(architectures=["LlamaForCausalLM"], **kw)


def _shapes() -> dict[str, Callable[[], Any]]:
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    llama31_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    return {
        "llama-3-8b": lambda: _llama(**_LLAMA3),
        "llama-3.1-8b": lambda: _llama(
            **{**_LLAMA3, "max_position_embeddings": 131072, "rope_parameters": llama31_rope}
        ),
        # One decoder layer of the 70B: per-layer kernels and KV size at 70B dims on one GPU.
        "llama-3-70b-layer": lambda: _llama(
            **{
                **_LLAMA3,
                "hidden_size": 8192,
                "intermediate_size": 28672,
                "num_hidden_layers": 1,
                "num_attention_heads": 64,
            }
        ),
        "llama-2-7b": lambda: _llama(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        # v0.2 layout: rope 1e6 and no sliding window.
        "mistral-7b": lambda: MistralConfig(
            architectures=["MistralForCausalLM"],
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            sliding_window=None,
        ),
        "qwen2-7b": lambda: Qwen2Config(
            architectures=["Qwen2ForCausalLM"],
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            eos_token_id=151643,
            **_QWEN_COMMON,
        ),
        "qwen3-8b": lambda: Qwen3Config(
            architectures=["Qwen3ForCausalLM"],
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            eos_token_id=151645,
            **_QWEN_COMMON,
        ),
        "smollm2-135m": lambda: _llama(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
        # Small enough for unit tests on CPU.
        "tiny-llama": lambda: _llama(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    }


DUMMY_SHAPES: tuple[str, ...] = (
    "llama-3-8b",
    "llama-3.1-8b",
    "llama-3-70b-layer",
    "llama-2-7b",
    "mistral-7b",
    "qwen2-7b",
    "qwen3-8b",
    "smollm2-135m",
    "tiny-llama",
)


def is_dummy_shape(name: str) -> bool:
    return name.lower() in DUMMY_SHAPES


def dummy_config(name: str) -> Any:
    """A fresh transformers config for shape `name` (KeyError when unknown)."""
    return _shapes()[name.lower()]()
