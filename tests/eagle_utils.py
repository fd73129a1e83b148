"""Random EAGLE / EAGLE-3 heads saved in the published checkpoint layouts (SafeAILab's names,
config.json + safetensors), sized for a given target: what tests load instead of a download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmconsole.core.models.config import ModelConfig


def save_eagle_head(
    folder: Path,
    target: ModelConfig,
    version: int,
    draft_vocab: int | None = None,
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    """Write a random head for `target`. EAGLE-3 heads get a reduced vocabulary of
    `draft_vocab` ids (every other target id, through d2t) unless it is None."""
    gen = torch.Generator().manual_seed(seed)
    h, q, kv, inter = target.hidden_size, target.q_size, target.kv_size, target.intermediate_size

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    prefix = "midlayer." if version == 3 else "layers.0."
    attn_in = 2 * h if version == 3 else h
    tensors = {
        f"{prefix}self_attn.q_proj.weight": rand(q, attn_in),
        f"{prefix}self_attn.k_proj.weight": rand(kv, attn_in),
        f"{prefix}self_attn.v_proj.weight": rand(kv, attn_in),
        f"{prefix}self_attn.o_proj.weight": rand(h, q),
        f"{prefix}mlp.gate_proj.weight": rand(inter, h),
        f"{prefix}mlp.up_proj.weight": rand(inter, h),
        f"{prefix}mlp.down_proj.weight": rand(h, inter),
        f"{prefix}post_attention_layernorm.weight": torch.ones(h),
    }
    config = target.hf_config.to_dict()
    config.update(num_hidden_layers=1, torch_dtype="float32")
    if version == 1:
        tensors["fc.weight"] = rand(h, 2 * h)
        tensors["fc.bias"] = torch.zeros(h)
        config["architectures"] = ["LlamaForCausalLM"]
    else:
        vocab = draft_vocab or target.vocab_size
        tensors["fc.weight"] = rand(h, 3 * h)
        tensors[f"{prefix}input_layernorm.weight"] = torch.ones(h)
        tensors[f"{prefix}hidden_norm.weight"] = torch.ones(h)
        tensors["norm.weight"] = torch.ones(h)
        tensors["lm_head.weight"] = rand(vocab, h)
        if draft_vocab is not None:
            hot = torch.arange(draft_vocab) * (target.vocab_size // draft_vocab)
            tensors["d2t"] = hot - torch.arange(draft_vocab)
            t2d = torch.zeros(target.vocab_size, dtype=torch.bool)
            t2d[hot] = True
            tensors["t2d"] = t2d
        config.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=vocab)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, default=str))
    return folder


def count_kv_moves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Slots moved per tree verify pass (accepted side branches); the real move still runs."""
    from llmconsole.core.spec import tree_verify

    moved: list[int] = []
    real_move = tree_verify._move_kv

    def counting_move(runner, src, dst):  # type: ignore[no-untyped-def]
        moved.append(len(src))
        real_move(runner, src, dst)

    monkeypatch.setattr(tree_verify, "_move_kv", counting_move)
    return moved
