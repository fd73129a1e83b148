"""EAGLE and EAGLE-3 draft heads: one decoder layer that drafts from the target's hidden states.

EAGLE (Li et al., 2024; SGLang's EAGLE, which runs EAGLE-1 and EAGLE-2 checkpoints): position i
reads the target's final normed hidden state f_i and the embedding of token i + 1 through
fc([embed; f]) -> H, then one decoder layer without its input norm; the target's LM head scores
the unnormed output h, which is also the hidden state of the next draft step.

EAGLE-3 (Li et al., 2025): fc fuses the residual streams entering three target layers (low, mid,
high; by default layers 2, L/2 and L-3) into H; the layer's attention reads
[norm(embed); norm(h)] (2H wide); a final norm and the head's own LM head score a reduced draft
vocabulary that `d2t` maps back (target id = draft id + d2t[draft id]). Later draft steps feed
the layer's pre-norm output back in place of the fused target states.

Checkpoints are read in the published layouts (SafeAILab's `layers.0.*` / `midlayer.*`, with or
without a `model.` prefix, safetensors or pytorch_model.bin); the embedding is always the
target's, and so is the LM head of an EAGLE head or of an EAGLE-3 checkpoint without one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..attention.base import AttentionBackend
from ..config import ConfigError
from ..models.config import ModelConfig
from ..models.llama import (
    MLP,
    Attention,
    Kernels,
    Linear,
    LlamaForCausalLM,
    RMSNorm,
    RotaryEmbedding,
    load_hf_weights,
)

EAGLE3_DRAFT_VOCAB = 32000  # the published EAGLE-3 heads' reduced vocabulary (random heads)


@dataclass(frozen=True)
class EagleLayout:
    """What a head checkpoint holds, read from its config and tensor names."""

    version: int  # 1: EAGLE / EAGLE-2 heads; 3: EAGLE-3
    config: ModelConfig  # the head's layer (num_layers 1) and rope
    target_layers: tuple[int, ...]  # LlamaForCausalLM.capture_features of the target
    draft_vocab: int
    fc_in: int
    fc_bias: bool
    own_lm_head: bool

    @property
    def feature_width(self) -> int:
        """Width of the target features a catch-up row reads (one hidden state per layer)."""
        return len(self.target_layers) * self.config.hidden_size


class EagleHead(nn.Module):
    """forward(ids [T], positions [T], attn, logit_indices [S], hidden [T, F]) ->
    (logits [S, V] fp32 over the target vocabulary, hidden [S, H] for the next draft step).
    `hidden` is the target's features (F = fc_in) or the head's own output (F = H)."""

    def __init__(self, layout: EagleLayout, target: LlamaForCausalLM, dtype: torch.dtype) -> None:
        super().__init__()
        c = layout.config
        h = c.hidden_size
        kernels = Kernels.for_device(torch.empty(0).device)
        self.layout = layout
        self.config = c
        self.key: object = None  # what loaded it (speculator.eagle_key), set by the loader
        self.fc = Linear(layout.fc_in, h, dtype, bias=layout.fc_bias)
        self.self_attn = Attention(c, 0, dtype, kernels)
        self.post_attention_layernorm = RMSNorm(h, c.rms_norm_eps, dtype, kernels)
        self.mlp = MLP(c, dtype, kernels)
        self.rotary = RotaryEmbedding(c, kernels)
        # Shared with the target, not registered: they are the target's parameters.
        self._target = (target,)
        if layout.version == 3:
            self.self_attn.qkv_proj = Linear(2 * h, c.q_size + 2 * c.kv_size, dtype)
            self.input_layernorm = RMSNorm(h, c.rms_norm_eps, dtype, kernels)
            self.hidden_norm = RMSNorm(h, c.rms_norm_eps, dtype, kernels)
            self.norm = RMSNorm(h, c.rms_norm_eps, dtype, kernels)
            if layout.own_lm_head:
                self.lm_head = Linear(h, layout.draft_vocab, dtype)
        # target id of each draft-vocabulary id; None when the vocabularies are the same
        self.hot_ids: torch.Tensor | None = None
        if layout.draft_vocab != c.vocab_size:
            self.hot_ids = torch.arange(layout.draft_vocab)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.layout.version == 3 and self.layout.own_lm_head:
            return self.lm_head.weight
        return self._target[0].lm_head_weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        attn: AttentionBackend,
        logit_indices: torch.Tensor,  # [S]
        hidden: torch.Tensor,  # [T, F]
        out: tuple[torch.Tensor, torch.Tensor] | None = None,  # static [S, V], [S, H] (graphs)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`out`: buffers to write the outputs into, in the model's dtype; with a reduced
        vocabulary only its columns are written (the rest must hold -inf already)."""
        embeds = self._target[0].embed_tokens(input_ids)  # [T, H]
        rope = self.rotary.step(positions, embeds.dtype)
        h = self.config.hidden_size
        if self.layout.version == 1:
            x = self.fc(torch.cat([embeds, hidden.to(embeds.dtype)], dim=-1))
            residual = x
            x = self.self_attn(x, rope, attn)  # EAGLE's layer has no input norm
            x, residual = self.post_attention_layernorm.add_and_norm(x, residual)
            h_out = self.mlp(x) + residual  # [T, H]
            normed = h_out
        else:
            x = hidden.to(embeds.dtype)
            if x.shape[-1] != h:
                x = self.fc(x)  # the target's fused low/mid/high states -> H
            residual = x.clone()  # add_and_norm may update it in place
            x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(x)], dim=-1)
            x = self.self_attn(x, rope, attn)
            x, residual = self.post_attention_layernorm.add_and_norm(x, residual)
            normed, h_out = self.norm.add_and_norm(self.mlp(x), residual)
        logits = torch.nn.functional.linear(normed[logit_indices], self.lm_head_weight)
        if out is not None:
            logits_out, hidden_out = out
            if self.hot_ids is None:
                logits_out.copy_(logits)
            else:
                logits_out.index_copy_(1, self.hot_ids, logits)
            hidden_out.copy_(h_out[logit_indices])
            return logits_out, hidden_out
        logits = logits.float()
        if self.hot_ids is not None:  # scatter the draft vocabulary into the target's
            full = logits.new_full((logits.shape[0], self.config.vocab_size), float("-inf"))
            logits = full.index_copy_(1, self.hot_ids, logits)
        return logits, h_out[logit_indices]

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights (a head for --load-format dummy benchmarks); norms 1, biases 0."""
        gen = torch.Generator(self.fc.weight.device).manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, std, generator=gen)
        if self.hot_ids is not None:
            self.hot_ids = self.hot_ids.to(self.fc.weight.device)


def read_layout(folder: Path, version: int, target: ModelConfig) -> EagleLayout:
    """The head layout of a checkpoint folder, checked against the algorithm and the target."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"--speculative-draft-model-path {folder}: no config.json (an EAGLE head folder "
            "holds config.json and its weights)"
        )
    names = {name: tuple(t.shape) for name, t in _iter_tensors(folder, shapes_only=True)}
    archs = json.loads(config_file.read_text()).get("architectures") or []
    # EAGLE-3: SafeAILab's `midlayer.*`, a hidden_norm (any naming), or the architecture name.
    eagle3_marks = (".midlayer.", "hidden_norm.")
    found = 3 if any(m in f".{n}" for n in names for m in eagle3_marks) else 1
    if any("eagle3" in str(a).lower() for a in archs):
        found = 3
    if not any(n.endswith("fc.weight") for n in names):
        raise ConfigError(
            f"--speculative-draft-model-path {folder} is not an EAGLE head (no fc.weight)"
        )
    if found != version:
        want = "eagle3" if found == 3 else "eagle"
        raise ConfigError(
            f"{folder} is an EAGLE{'-3' if found == 3 else ''} head; use "
            f"--speculative-algorithm {want}"
        )
    from transformers import LlamaConfig

    raw = json.loads(config_file.read_text())
    hf = LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    config = ModelConfig.from_hf(hf, architecture=f"Eagle{version}Head")
    # Published heads state short contexts (EAGLE-3's Llama-3.1 head says 2048); the head
    # drafts wherever the target runs, so its rope table covers the target's context.
    config = dataclasses.replace(
        config,
        max_position_embeddings=max(config.max_position_embeddings, target.max_position_embeddings),
    )
    fc_in = names[_find(names, "fc.weight")][1]
    draft_vocab = int(raw.get("draft_vocab_size") or config.vocab_size)
    own_lm_head = version == 3 and _find(names, "lm_head.weight", required=False) is not None
    if version == 1:
        layers: tuple[int, ...] = (target.num_layers,)
    else:
        ids = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        layers = eagle3_layers(target.num_layers, ids)
    layout = EagleLayout(
        version,
        config,
        layers,
        draft_vocab,
        fc_in,
        _find(names, "fc.bias", required=False) is not None,
        own_lm_head,
    )
    check_layout(layout, target, str(folder))
    return layout


def eagle3_layers(num_layers: int, ids: list[int] | None = None) -> tuple[int, ...]:
    """The target layers whose inputs EAGLE-3 fuses: the checkpoint's (its ids name the layer
    whose output is taken, so +1) or low / mid / high, kept inside small models."""
    layers = [i + 1 for i in ids] if ids else [2, num_layers // 2, num_layers - 3]
    return tuple(min(max(i, 1), num_layers - 1) for i in layers)


def random_layout(version: int, target: ModelConfig) -> EagleLayout:
    """A head of the target's shape (random weights, for dummy-weight benchmarks)."""
    config = ModelConfig.from_hf(target.hf_config, architecture=f"Eagle{version}Head")
    config = dataclasses.replace(config, num_layers=1)
    h = target.hidden_size
    if version == 1:
        return EagleLayout(1, config, (target.num_layers,), target.vocab_size, 2 * h, True, False)
    layers = eagle3_layers(target.num_layers)
    vocab = min(EAGLE3_DRAFT_VOCAB, target.vocab_size)
    return EagleLayout(3, config, layers, vocab, len(layers) * h, False, True)


def check_layout(layout: EagleLayout, target: ModelConfig, name: str) -> None:
    h, th = layout.config.hidden_size, target.hidden_size
    wanted = 2 * h if layout.version == 1 else len(layout.target_layers) * th
    if layout.config.vocab_size != target.vocab_size or layout.fc_in != wanted or h != th:
        raise ConfigError(
            f"EAGLE head {name} does not fit the target: it reads fc inputs of {layout.fc_in} "
            f"and a vocabulary of {layout.config.vocab_size}; the target has hidden size {th} "
            f"(fc input {wanted} expected) and a vocabulary of {target.vocab_size}"
        )
    if not layout.own_lm_head and layout.draft_vocab != target.vocab_size:
        raise ConfigError(f"EAGLE head {name} has a reduced vocabulary but no lm_head.weight")


def load_head_weights(head: EagleHead, folder: Path) -> None:
    """Fill `head` from the checkpoint in `folder` (its layout read by `read_layout`)."""
    version = head.layout.version
    d2t: list[torch.Tensor] = []

    def rename(name: str) -> str | None:
        name = name.removeprefix("model.")
        if name == "d2t":
            return None
        if name in ("embed_tokens.weight", "t2d") or "rotary_emb" in name:
            return None  # the embedding is the target's; t2d is d2t's inverse
        if version == 1 and (name == "lm_head.weight" or "input_layernorm" in name):
            return None  # EAGLE's layer has no input norm; its LM head is the target's
        if version == 3 and name == "lm_head.weight" and not head.layout.own_lm_head:
            return None
        return name.removeprefix("layers.0.").removeprefix("midlayer.")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in _iter_tensors(folder):
            if name.removeprefix("model.") == "d2t":
                d2t.append(tensor)
            yield name, tensor

    try:
        load_hf_weights(head, head.config, tensors(), rename)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"EAGLE head {folder}: {exc}") from exc
    if head.hot_ids is not None:
        if not d2t:
            raise ConfigError(f"EAGLE head {folder} has a reduced vocabulary but no d2t table")
        offsets = d2t[0].to(torch.int64)
        head.hot_ids = torch.arange(len(offsets)) + offsets
        if int(head.hot_ids.max()) >= head.config.vocab_size or int(head.hot_ids.min()) < 0:
            raise ConfigError(f"EAGLE head {folder}: d2t maps outside the target vocabulary")
        head.hot_ids = head.hot_ids.to(head.fc.weight.device)


def _find(names: dict[str, tuple[int, ...]], suffix: str, required: bool = True) -> str | None:
    for name in names:
        if name.removeprefix("model.") == suffix:
            return name
    if required:
        raise ConfigError(f"EAGLE head checkpoint has no {suffix}")
    return None


def _iter_tensors(folder: Path, shapes_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight file: safetensors, else pytorch_model*.bin (loaded with
    weights_only). `shapes_only` yields meta tensors where the format allows it."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if shapes_only:
                        shape = f.get_slice(name).get_shape()
                        yield name, torch.empty(shape, device="meta")
                    else:
                        yield name, f.get_tensor(name)
        return
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ConfigError(f"EAGLE head folder {folder} has no *.safetensors or pytorch_model.bin")
    for file in bins:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()
