"""ModelConfig: the handful of numbers our Llama-family code needs, read once from a HF config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: bias on q/k/v
    qk_norm: bool  # Qwen3: RMSNorm on each head of q and k before rope
    eos_token_ids: tuple[int, ...]
    hf_config: Any  # the source's config (kept for rope parameters); never mutated

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.kv_size * elem

    @staticmethod
    def from_hf(hf_config: Any, architecture: str | None = None) -> ModelConfig:
        """`architecture` names a module of ours that reads this config in its own way (an
        EAGLE head), skipping the check against the supported model list."""
        archs = list(getattr(hf_config, "architectures", None) or [])
        model_type = getattr(hf_config, "model_type", "")
        by_type = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }
        arch = architecture or (archs[0] if archs else by_type.get(model_type, model_type))
        if architecture is None and arch not in SUPPORTED_ARCHITECTURES:
            from .errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        eos = hf_config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        max_pos = hf_config.max_position_embeddings
        # Sliding-window attention is not implemented: cap the context at the window instead of
        # silently attending beyond it (Mistral v0.1; later Mistrals set it to null).
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True):
            max_pos = min(max_pos, window)
        return ModelConfig(
            architecture=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM"
            or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            eos_token_ids=eos_ids,
            hf_config=hf_config,
        )

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [head_dim/2] and the cos/sin scale, for every rope type HF knows.

        transformers owns the rope-scaling maths (llama3, linear, dynamic, yarn); we only call it.
        """
        cfg = self.hf_config
        params = _rope_parameters(cfg)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            base = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
            return (1.0 / base**exponents).float(), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # slow: not for default

        if hasattr(cfg, "to_transformers"):  # a cached ResolvedConfig: transformers wants its own
            cfg = cfg.to_transformers()
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
        return inv_freq.float(), float(scale)


def _rope_parameters(cfg: Any) -> dict[str, Any]:
    # transformers 5 keeps everything in `rope_parameters`; 4.x used rope_theta + rope_scaling.
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return params
    merged: dict[str, Any] = dict(getattr(cfg, "rope_scaling", None) or {})
    merged.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return merged
