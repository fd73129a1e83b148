"""Our Llama-family model (Llama 2/3/3.1, Mistral, Qwen2, Qwen3, SmolLM) over a ragged batch.

Inputs are flattened: every new token of every request in one [T] vector, with its position; the
attention backend knows which request each token belongs to and where its KV lives. Q/K/V and
gate/up are merged into one matmul each (fewer, larger GEMMs; one weight read per step).

On CUDA the element-wise work runs in our Triton kernels (llmconsole.kernels): fused residual-add
+ RMSNorm, SiLU-and-mul, and rope fused with the paged-KV write. Elsewhere (CPU) it is plain
torch, which is what the CPU tests compare with transformers.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmconsole.kernels import cpu_elementwise

from ..attention.base import AttentionBackend
from ..cpu_kernels import elementwise
from . import cpu_gemm
from .config import ModelConfig

if TYPE_CHECKING:
    from llmconsole.kernels.skinny_gemm import SplitPartials

    from .gguf_blocks import BlockWeight

    # A projection's output, or (batched decode in a CUDA graph) its split-K slices not yet
    # summed, which the next RMSNorm adds in the same kernel.
    Hidden = torch.Tensor | SplitPartials

_ADOPT_ENV = "LLMCONSOLE_ADOPT_WEIGHTS"  # "0": copy every weight (A/B runs)
# Merged projections and the checkpoint's parts they hold, in row order
MERGED_PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


@dataclass(frozen=True)
class Kernels:
    """Our Triton kernels, for models built on CUDA (imported once, at model build)."""

    norm: ModuleType
    activation: ModuleType
    rope_kv: ModuleType
    gemv: ModuleType
    skinny_gemm: ModuleType

    @staticmethod
    def for_device(device: torch.device) -> Kernels | None:
        if device.type != "cuda" or importlib.util.find_spec("triton") is None:
            return None
        from ...kernels import activation, gemv, norm, rope_kv, skinny_gemm, skinny_table

        try:  # a bad table file fails the load in one line, not a graph capture later
            skinny_table.table_on(device)
        except ValueError as e:
            from ..config import ConfigError

            raise ConfigError(f"{e} (or set {skinny_table.TUNING_ENV}=off)") from None
        return Kernels(norm, activation, rope_kv, gemv, skinny_gemm)


def mirror(module: nn.Module, *names: str) -> None:
    """Also keep the registered parameters or submodules `names` in the instance's __dict__, where
    attribute lookup finds them first. Otherwise every `self.weight` or `self.mlp` in a forward
    pass goes through nn.Module.__getattr__ (~1.5 us on a small CPU, ~500 lookups a decode
    step). Safe because nn.Module.__setattr__ drops such an entry whenever the name is assigned a
    new parameter or module, and parameters are only ever filled in place."""
    for name in names:
        module.__dict__[name] = getattr(module, name)


class Linear(nn.Module):
    """y = x W^T (+ b). Weights start uninitialised: they are always loaded or randomised
    afterwards, and skipping nn.Linear's init keeps model construction instant."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        bias: bool = False,
        kernels: Kernels | None = None,
    ) -> None:
        super().__init__()
        weight = torch.empty(out_features, in_features, dtype=dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            if bias
            else None
        )
        self.kernels = kernels
        # fp32 on CPU: MKL's packed GEMM for batched decode (see cpu_gemm), else None
        self.packed = cpu_gemm.for_weight(self.weight, self.bias)
        # a GGUF checkpoint's blocks of this weight, for few-row products on CPU (gguf_blocks)
        self.blocks: BlockWeight | None = None
        mirror(self, "weight", "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks
        if blocks is not None and blocks.applies(x.shape[0]):
            return blocks(x)
        packed = self.packed
        if packed is not None and packed.applies(x.shape[0]):
            return packed(x)
        return linear(x, self.weight, self.bias, self.kernels)

    def forward_unsummed(self, x: torch.Tensor) -> Hidden:
        """forward(x), except that a split-K skinny GEMM hands back its slices unsummed: for a
        projection whose only reader is RMSNorm.add_and_norm (o and down)."""
        kernels = self.kernels
        if (
            kernels is not None
            and kernels.skinny_gemm.DEFER_SUM
            and x.shape[0] > 1
            and _graph_skinny(x, self.weight, kernels)
        ):
            return kernels.skinny_gemm.skinny_gemm(x, self.weight, self.bias, defer_sum=True)
        return self.forward(x)


def linear(
    x: torch.Tensor,  # [T, in]
    weight: torch.Tensor,  # [out, in]
    bias: torch.Tensor | None,
    kernels: Kernels | None,
    out: torch.Tensor | None = None,  # [T, out]
) -> torch.Tensor:
    """x W^T (+ b). One row captured into a CUDA graph (batch-1 decode) goes through our GEMV,
    a few rows (batched decode) through our skinny GEMM: both stream the weight faster than
    cuBLAS does for such thin products. Eager steps keep cuBLAS: a Triton launch costs more host
    time per call than cuBLAS's, which a graph replay skips but an eager step of ~130
    projections would pay on every step."""
    if kernels is not None:
        if _graph_gemv(x, weight, kernels):
            return kernels.gemv.gemv(x, weight, bias, out=out)
        if x.shape[0] > 1 and _graph_skinny(x, weight, kernels):
            return kernels.skinny_gemm.skinny_gemm(x, weight, bias, out=out)
    if out is not None:
        assert bias is None
        return torch.mm(x, weight.t(), out=out)
    return F.linear(x, weight, bias)


def _graph_gemv(x: torch.Tensor, weight: torch.Tensor, kernels: Kernels) -> bool:
    """One row being captured into a CUDA graph, in a layout the GEMV takes."""
    return (
        x.shape[0] == 1  # cheapest test first: this runs for every projection of a step
        and torch.cuda.is_current_stream_capturing()
        and kernels.gemv.supported(x, weight)
    )


def _graph_skinny(x: torch.Tensor, weight: torch.Tensor, kernels: Kernels) -> bool:
    """A few rows being captured into a CUDA graph, in a layout the skinny GEMM takes. Capture is
    tested first: past 64 rows `supported` looks up the card's table, which eager steps skip."""
    return torch.cuda.is_current_stream_capturing() and kernels.skinny_gemm.supported(x, weight)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        weight = torch.empty(num_embeddings, dim, dtype=dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        mirror(self, "weight")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(
        self, dim: int, eps: float, dtype: torch.dtype, kernels: Kernels | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.kernels = kernels
        self.normalized_shape = (dim,)
        mirror(self, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and x.dim() == 2:
            return self.kernels.norm.rms_norm(x, self.weight, self.eps)
        lib = elementwise(x) if x.dim() == 2 else None
        if lib is not None:  # CPU: one C call
            return cpu_elementwise.add_rms_norm(lib, x.contiguous(), None, self.weight, self.eps)[0]
        if x.dtype == torch.float32:  # torch's fused kernel: one op instead of seven
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        x32 = x.float()  # half precision: normalise in fp32, as the checkpoints were trained
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_and_norm(self, x: Hidden, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pre-norm block's two outputs in one call."""
        if not isinstance(x, torch.Tensor):  # split-K slices: summed in the norm's kernel
            assert self.kernels is not None
            return self.kernels.norm.split_add_rms_norm(
                x.parts, x.bias, residual, self.weight, self.eps
            )
        if self.kernels is not None:
            # In place: x is a fresh projection output and residual the layer stack's own.
            return self.kernels.norm.fused_add_rms_norm(
                x, residual, self.weight, self.eps, inplace=True
            )
        lib = elementwise(x) if x.dim() == 2 and x.is_contiguous() else None
        if lib is not None and residual.is_contiguous():  # CPU: one C call, in place too
            normed, summed = cpu_elementwise.add_rms_norm(
                lib, x, residual, self.weight, self.eps, inplace=True
            )
            return normed, summed  # type: ignore[return-value]
        residual = x + residual
        return self.forward(residual), residual


@dataclass(frozen=True)
class Rope:
    """One step's rotary inputs: cos/sin per token (torch path), or the positions and the fp32
    [cos | sin] table the fused rope + KV-write kernel reads (CUDA path)."""

    positions: torch.Tensor  # [T]
    # [T, 1, D] each; sin's first half negated (rotate-half's sign, folded in once per step)
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
    table: torch.Tensor | None = None  # [max_positions, D] fp32
    # [T, H + 2 Hkv, D] each, for rope over a whole merged q|k|v row: cos 1 and sin 0 on the v
    # heads, which leaves them unchanged bit for bit (v * 1 + x * 0; finite v). Torch path only.
    qkv_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None


class RotaryEmbedding(nn.Module):
    """cos/sin per position, computed for the step's positions once and shared by all layers."""

    def __init__(self, config: ModelConfig, kernels: Kernels | None = None) -> None:
        super().__init__()
        device = torch.empty(0).device  # where the model is being built (`with torch.device`)
        self.config = config
        with torch.device("cpu"):  # transformers' rope maths, computed once on the host
            inv_freq, self.scale = config.rope_inv_freq()
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # fp32, always
        self.table: torch.Tensor | None = None
        if kernels is not None:
            self.table = kernels.rope_kv.rope_cos_sin_cache(
                self.inv_freq, config.max_position_embeddings, self.scale
            )

    def step(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        if self.table is not None:
            return Rope(positions, table=self.table)
        cos, sin = self.cos_sin(positions, dtype)
        if self.config.qk_norm:  # q and k are normed before rope: roped apart from v
            return Rope(positions, cos_sin=(cos, sin))
        # The merged q|k|v row roped in one go: per layer one view and one split fewer.
        t, rotated, d = cos.shape[0], self.config.num_heads + self.config.num_kv_heads, cos.shape[2]
        v_heads = (t, self.config.num_kv_heads, d)
        qkv_cos = torch.cat([cos.expand(t, rotated, d), cos.new_ones(v_heads)], dim=1)
        qkv_sin = torch.cat([sin.expand(t, rotated, d), sin.new_zeros(v_heads)], dim=1)
        return Rope(positions, cos_sin=(cos, sin), qkv_cos_sin=(qkv_cos, qkv_sin))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, D]
        cos = (emb.cos() * self.scale).to(dtype)[:, None, :]  # [T, 1, D]
        sin = (emb.sin() * self.scale).to(dtype)[:, None, :]
        half = sin.shape[-1] // 2
        sin[..., :half].neg_()  # exact: apply_rope's rotated half then needs no negation
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] in the rotate-half layout Hugging Face checkpoints store q/k in; cos, sin
    from `RotaryEmbedding.cos_sin` (sin's first half negated). x * cos + [-x2, x1] * sin as
    four ops instead of seven: roll gives [x2, x1], and the sign sits in sin (bit for bit the
    same values, as a negation is exact)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, dtype: torch.dtype, kernels: Kernels | None
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        self.kernels = kernels
        self.qkv_proj = Linear(
            config.hidden_size,
            config.q_size + 2 * config.kv_size,
            dtype,
            bias=config.attention_bias,
            kernels=kernels,
        )
        self.o_proj = Linear(config.q_size, config.hidden_size, dtype, kernels=kernels)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
            mirror(self, "q_norm", "k_norm")
        self.scale = config.head_dim**-0.5
        # q, k, v heads of the merged projection, and their sum
        nq, nkv = config.num_heads, config.num_kv_heads
        self.qkv_split, self.qkv_heads = (nq, nkv, nkv), nq + 2 * nkv
        mirror(self, "qkv_proj", "o_proj")

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        rope: Rope,
        attn: AttentionBackend,
    ) -> Hidden:
        qkv = self.qkv_proj.forward(hidden)
        if rope.qkv_cos_sin is not None:  # torch path, no q/k norm: the backend may fuse it all
            cos, sin = (t.flatten(1) for t in rope.cos_sin)  # type: ignore[union-attr]
            heads = self.config.num_heads
            out = attn.decode_from_qkv(self.layer_id, qkv, cos, sin, heads, self.scale)
            if out is not None:
                return self.o_proj.forward_unsummed(out.view(-1, self.config.q_size))
        q, k, v, kv_written = self._rope_qkv(qkv, rope, attn)
        out = attn.forward(self.layer_id, q, k, v, self.scale, kv_written=kv_written)  # [T, H, D]
        return self.o_proj.forward_unsummed(out.reshape(-1, self.config.q_size))

    def _rope_qkv(
        self,
        qkv: torch.Tensor,  # [T, q_size + 2 kv_size]
        rope: Rope,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """q [T, H, D], k and v [T, Hkv, D] with rope applied (and q/k norm where the model has
        it); the flag is True when k and v are already written into the pool."""
        c = self.config
        if rope.qkv_cos_sin is not None:  # torch path, no q/k norm: rope q|k|v in one go
            qkv = apply_rope(qkv.view(-1, self.qkv_heads, c.head_dim), *rope.qkv_cos_sin)
            q, k, v = qkv.split_with_sizes(self.qkv_split, dim=1)
            return q, k, v, False
        qk, v = qkv.split_with_sizes([c.q_size + c.kv_size, c.kv_size], dim=-1)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = qk.split_with_sizes([c.q_size, c.kv_size], dim=-1)
            q = self.q_norm(q.view(-1, c.num_heads, c.head_dim))
            k = self.k_norm(k.view(-1, c.num_kv_heads, c.head_dim))
            qk = torch.cat([q, k], dim=1)
        else:
            qk = qk.view(-1, c.num_heads + c.num_kv_heads, c.head_dim)
        if rope.table is not None and self.kernels is not None:
            # One kernel: rotate q in place, write rotated k and v into the pool.
            q, k = qk.split_with_sizes([c.num_heads, c.num_kv_heads], dim=1)
            pool = attn.pool
            self.kernels.rope_kv.rope_and_write_kv(
                q,
                k,
                v,
                rope.positions,
                rope.table,
                pool.k[self.layer_id],
                pool.v[self.layer_id],
                attn.write_slots,
            )
            return q, k, v, True
        assert rope.cos_sin is not None
        # Rope on q and k heads together: one set of element-wise ops instead of two.
        qk = apply_rope(qk, *rope.cos_sin)
        q, k = qk.split_with_sizes([c.num_heads, c.num_kv_heads], dim=1)
        return q, k, v, False


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, kernels: Kernels | None) -> None:
        super().__init__()
        self.gate_up_proj = Linear(
            config.hidden_size, 2 * config.intermediate_size, dtype, kernels=kernels
        )
        self.down_proj = Linear(
            config.intermediate_size, config.hidden_size, dtype, kernels=kernels
        )
        self.kernels = kernels
        mirror(self, "gate_up_proj", "down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward_unsummed(x)
        return out if isinstance(out, torch.Tensor) else out.finish()

    def forward_unsummed(self, x: torch.Tensor) -> Hidden:
        """forward(x); down's split-K slices may come back unsummed (Linear.forward_unsummed)."""
        kernels = self.kernels
        if kernels is not None:
            gate_up = self.gate_up_proj
            if gate_up.bias is None and _graph_gemv(x, gate_up.weight, kernels):
                # Batch 1 in a graph: SiLU-and-mul in the GEMV's epilogue, one kernel fewer.
                return self.down_proj.forward(kernels.gemv.gemv_silu_mul(x, gate_up.weight))
            if (
                gate_up.bias is None
                and x.shape[0] > 1
                and torch.cuda.is_current_stream_capturing()
                and kernels.skinny_gemm.supports_silu_mul(x, gate_up.weight)
            ):  # batched decode in a graph: the same in the skinny GEMM's epilogue
                act = kernels.skinny_gemm.skinny_gemm_silu_mul(x, gate_up.weight)
                return self.down_proj.forward_unsummed(act)
            return self.down_proj.forward(kernels.activation.silu_and_mul(gate_up.forward(x)))
        gate_up = self.gate_up_proj.forward(x)
        lib = elementwise(gate_up)
        if lib is not None:  # CPU: one C call
            return self.down_proj.forward(cpu_elementwise.silu_mul(lib, gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        # In place on the fresh gate_up output: two fewer [T, intermediate] allocations.
        return self.down_proj.forward(F.silu(gate, inplace=True).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_id: int, dtype: torch.dtype, kernels: Kernels | None
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, kernels)
        self.self_attn = Attention(config, layer_id, dtype, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, kernels)
        self.mlp = MLP(config, dtype, kernels)
        mirror(self, "input_layernorm", "self_attn", "post_attention_layernorm", "mlp")

    def forward(
        self,
        hidden: Hidden,
        residual: torch.Tensor | None,
        rope: Rope,
        attn: AttentionBackend,
    ) -> tuple[Hidden, torch.Tensor]:
        if residual is None:
            assert isinstance(hidden, torch.Tensor)  # the embeddings
            residual = hidden
            hidden = self.input_layernorm.forward(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn.forward(hidden, rope, attn)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp.forward_unsummed(hidden), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        """Parameters are created uninitialised in `dtype` on the current default device (build
        inside `with torch.device(...)`), then filled by `load_weights` or `init_random`."""
        super().__init__()
        self.config = config
        kernels = Kernels.for_device(torch.empty(0).device)
        self.uses_fused_kernels = kernels is not None
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, kernels) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, kernels)
        self.rotary = RotaryEmbedding(config, kernels)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype)
        self.kernels = kernels
        self.lm_head_packed = cpu_gemm.for_weight(self.lm_head_weight, None)
        self.lm_head_blocks: BlockWeight | None = None  # see Linear.blocks
        self.feature_layers: tuple[int, ...] = ()  # see capture_features

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.embed_tokens.weight
        return self.lm_head.weight

    def capture_features(self, layers: tuple[int, ...]) -> None:
        """Make forward passes that are handed a `features` buffer fill it with what an EAGLE
        head drafts from: per listed index i < num_layers the residual stream entering layer i
        (EAGLE-3's low / mid / high states), and for i == num_layers the final normed hidden
        state (EAGLE). () turns capture off."""
        if any(not 0 <= i <= self.config.num_layers for i in layers):
            raise ValueError(f"feature layers {layers} outside 0..{self.config.num_layers}")
        self.feature_layers = tuple(layers)

    @property
    def feature_size(self) -> int:
        return len(self.feature_layers) * self.config.hidden_size

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        attn: AttentionBackend,
        logit_indices: torch.Tensor | None = None,  # [S]: rows whose logits are wanted
        out: torch.Tensor | None = None,  # [S, V] in the model's dtype (a CUDA graph's buffer)
        features: torch.Tensor | None = None,  # [T, feature_size]: filled when given
    ) -> torch.Tensor:  # [S, V] fp32, or `out` (or [T, V] when logit_indices is None)
        embedded = self.embed_tokens(input_ids)
        rope = self.rotary.step(positions, embedded.dtype)
        stream: Hidden = embedded
        residual = None
        taps = self.feature_layers if features is not None else ()
        for i, layer in enumerate(self.layers):
            if i in taps:
                self._tap(features, taps.index(i), stream, residual)  # type: ignore[arg-type]
            # `.forward` here and in the layers: nn.Module.__call__'s hook dispatch costs ~10 us
            # a call on a small CPU, ~9 calls a layer, and these modules never carry hooks.
            stream, residual = layer.forward(stream, residual, rope, attn)
        assert residual is not None, "a model has at least one layer"
        hidden, _ = self.norm.add_and_norm(stream, residual)
        if self.config.num_layers in taps:
            self._tap(features, taps.index(self.config.num_layers), hidden, None)  # type: ignore[arg-type]
        if logit_indices is not None:
            hidden = hidden[logit_indices]
        blocks = self.lm_head_blocks
        if out is None and blocks is not None and blocks.applies(hidden.shape[0]):
            return blocks(hidden)  # fp32 already
        packed = self.lm_head_packed
        if out is None and packed is not None and packed.applies(hidden.shape[0]):
            return packed(hidden)  # fp32 already
        logits = linear(hidden, self.lm_head_weight, None, self.kernels, out=out)
        return logits if out is not None else logits.float()

    def _tap(
        self,
        features: torch.Tensor,  # [T, F]
        k: int,
        hidden: Hidden,  # [T, H]
        residual: torch.Tensor | None,
    ) -> None:
        """Write the residual stream (hidden + residual; the layers keep them apart) into the
        k-th hidden-size column block of `features`."""
        if not isinstance(hidden, torch.Tensor):  # split-K slices (the next norm sums them too)
            hidden = hidden.finish()
        h = self.config.hidden_size
        dest = features[:, k * h : (k + 1) * h]
        if residual is None:
            dest.copy_(hidden)
        else:
            torch.add(hidden, residual, out=dest)

    # ---- weights ---------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, merging q/k/v and gate/up as they stream past."""
        tied = self.config.tie_word_embeddings

        def rename(name: str) -> str | None:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and tied):
                return None
            return name

        load_hf_weights(self, self.config, weights, rename)

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights of the real shape (SGLang's --load-format dummy), for benchmarks. The
        same seed gives the same weights on the same device, run after run (drawn where the
        weights live, from a generator of that device)."""
        gens: dict[torch.device, torch.Generator] = {}
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight") or "layernorm" in name:
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    if param.device not in gens:
                        gens[param.device] = torch.Generator(param.device).manual_seed(seed)
                    param.normal_(0.0, std, generator=gens[param.device])


def load_hf_weights(
    module: nn.Module,
    config: ModelConfig,
    weights: Iterable[tuple[str, torch.Tensor]],
    rename: Callable[[str], str | None],
) -> None:
    """Copy Hugging Face-named tensors into `module`, merging q/k/v and gate/up as they stream
    past. `rename` maps a checkpoint name to the module's (None skips the tensor). Every
    parameter must be filled: a missing or misshapen tensor raises naming it."""
    c = config
    params = dict(module.named_parameters())
    sizes = {"q_proj": c.q_size, "k_proj": c.kv_size, "v_proj": c.kv_size,
             "gate_proj": c.intermediate_size, "up_proj": c.intermediate_size}  # fmt: skip
    merged: dict[str, tuple[str, int, int]] = {}  # part -> (merged projection, row offset, rows)
    for fused, parts in MERGED_PARTS.items():
        offset = 0
        for part in parts:
            merged[part] = (fused, offset, sizes[part])
            offset += sizes[part]
    loaded: set[str] = set()
    adopt = os.environ.get(_ADOPT_ENV, "1") != "0"
    for hf_name, tensor in weights:
        name = rename(hf_name)
        if name is None:
            continue
        parts = name.split(".")
        target = name
        rows = None
        if len(parts) >= 2 and parts[-2] in merged:
            fused, offset, size = merged[parts[-2]]
            target = ".".join([*parts[:-2], fused, parts[-1]])
            rows = (offset, size)
        param = params.get(target)
        if param is None:
            raise KeyError(f"checkpoint tensor {hf_name!r} has no place in {c.architecture}")
        with torch.no_grad():
            dest = param if rows is None else param.narrow(0, rows[0], rows[1])
            if dest.shape != tensor.shape:
                raise ValueError(
                    f"{hf_name}: checkpoint shape {tuple(tensor.shape)}, "
                    f"model expects {tuple(dest.shape)}"
                )
            if rows is None and adopt and _adoptable(tensor, param):
                param.data = tensor  # no copy: the file's mapped pages become the weight
            else:
                dest.copy_(tensor)
        loaded.add(target if rows is None else f"{target}[{rows[0]}]")
    missing = _expected_loads(module, merged) - loaded
    if missing:
        raise ValueError(
            f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}"
        )


def _adoptable(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    """A whole checkpoint tensor that can stand in for the parameter as it is: same dtype and
    device, dense. safetensors hands out CPU tensors over the file's memory map (copy-on-write),
    so on the CPU an fp32 checkpoint's unmerged weights load without being copied."""
    return tensor.dtype == param.dtype and tensor.device == param.device and tensor.is_contiguous()


def _expected_loads(model: nn.Module, merged: dict[str, tuple[str, int, int]]) -> set[str]:
    expected: set[str] = set()
    fused_offsets: dict[str, list[int]] = {}
    for _, (fused, offset, _) in merged.items():
        fused_offsets.setdefault(fused, []).append(offset)
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in fused_offsets:
            if parts[-1] == "weight" or parts[-2] == "qkv_proj":
                expected.update(f"{name}[{off}]" for off in fused_offsets[parts[-2]])
            continue
        expected.add(name)
    return expected
