"""GGUF blocks on the CPU: the C kernel against gguf's reference, and a quantized GGUF served
from its blocks (kernels/cpu_blocks.py, core/models/gguf_blocks.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from test_model_source import _tiny_model, _write_gguf

from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.model_loader import load_model
from llmconsole.core.models import gguf_blocks
from llmconsole.core.models.gguf_import import cache_root, cached_folder
from llmconsole.kernels import cpu_blocks

QTYPES = {"q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q8_0": QT.Q8_0}

pytestmark = pytest.mark.skipif(cpu_blocks._compiler() is None, reason="no C compiler here")


@pytest.fixture(scope="module")
def lib():
    built = cpu_blocks.library(cache_root() / "kernels")
    assert built is not None, cpu_blocks.unavailable_reason()
    return built


def random_blocks(kind: str, n: int, k: int, seed: int) -> np.ndarray:
    """[n, row_bytes] blocks with random values and random finite fp16 scales (subnormals,
    zeros and negatives included)."""
    rng = np.random.default_rng(seed)
    nb, size = n * k // 32, cpu_blocks.BLOCK_BYTES[kind]
    raw = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    fp16_fields = 2 if kind == "q4_1" else 1
    for f in range(fp16_fields):
        bits = rng.integers(0, 0x7C00, nb, dtype=np.uint16)  # below the inf/NaN exponent
        bits |= rng.integers(0, 2, nb, dtype=np.uint16) << 15
        bits[:4] = [0, 0x8000, 1, 0x3FF]  # zeros and subnormals
        raw[:, 2 * f : 2 * f + 2] = bits.view(np.uint8).reshape(nb, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("kind", sorted(QTYPES))
def test_dequantized_weights_equal_gguf_reference_bit_for_bit(lib, kind: str) -> None:
    raw = random_blocks(kind, 37, 96, seed=1)
    want = dequantize(raw, QTYPES[kind]).reshape(37, 96).astype(np.float32)
    got = cpu_blocks.dequantize(lib, torch.from_numpy(raw), kind, 96).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("kind", sorted(QTYPES))
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 33])
def test_matmul_equals_fp32_product_of_the_dequantized_weight(lib, kind: str, rows: int) -> None:
    n, k = 37, 160  # odd N: ragged tiles; K of five blocks
    rng = np.random.default_rng(rows)
    raw = rng.integers(0, 256, (n * k // 32, cpu_blocks.BLOCK_BYTES[kind]), dtype=np.uint8)
    scales = (rng.standard_normal((raw.shape[0], 2)) * 0.02).astype(np.float16)
    raw[:, :4] = scales.view(np.uint8)  # ordinary scales (and Q4_1 offsets)
    raw = raw.reshape(n, -1)
    weight = torch.from_numpy(dequantize(raw, QTYPES[kind]).reshape(n, k).astype(np.float32))
    x, bias = torch.randn(rows, k), torch.randn(n)
    got = cpu_blocks.matmul(lib, x, torch.from_numpy(raw), kind, bias)
    assert got.shape == (rows, n)
    assert_fp32_product(got, x, weight, bias)
    # a transposed (non-contiguous) x is taken too
    xt = torch.randn(k, rows).t()
    assert_fp32_product(cpu_blocks.matmul(lib, xt, torch.from_numpy(raw), kind), xt, weight)


def assert_fp32_product(
    got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """Equal to F.linear up to fp32 sum order: within ~K ulps of the sum of |terms|."""
    want = F.linear(x, weight, bias)
    terms = F.linear(x.abs(), weight.abs()) + (0 if bias is None else bias.abs())
    bound = x.shape[1] * torch.finfo(torch.float32).eps * terms
    assert ((got - want).abs() <= bound).all(), float(((got - want).abs() / bound).max())


def test_bad_inputs_raise_value_errors(lib) -> None:
    raw = torch.from_numpy(random_blocks("q4_1", 4, 64, seed=2))
    with pytest.raises(ValueError, match="multiples of 32 weights"):
        cpu_blocks.row_bytes("q4_1", 48)
    with pytest.raises(ValueError, match="do not hold 96 weights"):
        cpu_blocks.matmul(lib, torch.randn(2, 96), raw, "q4_1")
    with pytest.raises(ValueError, match="fp32 activations"):
        cpu_blocks.matmul(lib, torch.randn(2, 64, dtype=torch.float64), raw, "q4_1")
    with pytest.raises(ValueError, match="not q8_0 blocks"):
        cpu_blocks.dequantize(lib, raw, "q8_0", 64)
    assert cpu_blocks.matmul(lib, torch.randn(0, 64), raw, "q4_1").shape == (0, 4)


def test_kernel_runs_on_torchs_openmp_runtime(lib) -> None:
    """A second OpenMP runtime would bring a second pool of spinning workers to fight torch's."""
    cpu_blocks.matmul(lib, torch.randn(3, 64), torch.from_numpy(random_blocks("q8_0", 8, 64, 3)),
                      "q8_0")  # fmt: skip
    torch.mm(torch.randn(64, 64), torch.randn(64, 64))
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libomp" in line}
    assert len(runtimes) == 1, runtimes


def test_no_compiler_or_a_failing_one_leaves_none(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert cpu_blocks._load.__wrapped__(tmp_path) is None
    assert "no C compiler" in (cpu_blocks.unavailable_reason() or "")
    monkeypatch.setenv("CC", "false")  # found, exits 1
    assert cpu_blocks._load.__wrapped__(tmp_path) is None
    assert "failed" in (cpu_blocks.unavailable_reason() or "")
    assert not list(tmp_path.glob("*.so*"))  # no half-written library left behind


# --- a quantized GGUF, end to end -----------------------------------------------------------


def _write_quantized_gguf(path: Path, arch: str, kinds: dict[str, str]) -> None:
    """A tiny random `arch` model as a GGUF whose 2-D weights are stored as `kinds[proj]`
    (projection name -> kind; "f32" keeps a weight unquantized)."""
    import gguf

    model = _tiny_model(arch)
    f32 = path.with_suffix(".f32.gguf")
    _write_gguf(f32, arch, model)
    reader = gguf.GGUFReader(f32)
    writer = gguf.GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        data = np.asarray(t.data)
        proj = t.name.split(".")[-2]
        kind = kinds.get(proj, "f32")
        if data.ndim == 2 and kind != "f32":
            writer.add_tensor(t.name, quantize(data, QTYPES[kind]), raw_dtype=QTYPES[kind])
        else:
            writer.add_tensor(t.name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_gguf_decodes_from_its_blocks(tmp_path: Path, monkeypatch, arch: str) -> None:
    monkeypatch.setenv("LLMCONSOLE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / f"tiny-{arch}.gguf"
    # q|k|v share a kind and merge; gate (Q4_0) and up (Q8_0) differ, so gate|up keeps fp32
    kinds = {"attn_q": "q4_1", "attn_k": "q4_1", "attn_v": "q4_1", "attn_output": "q8_0",
             "ffn_gate": "q4_0", "ffn_up": "q8_0", "ffn_down": "q4_0", "output": "q8_0",
             "token_embd": "q4_1"}  # fmt: skip
    _write_quantized_gguf(path, arch, kinds)
    loaded = load_model(EngineConfig(model=str(path)).resolve("cpu", 0.0))
    model = loaded.model
    assert (cached_folder(path) / gguf_blocks.BLOCKS_FILE).is_file()
    # per layer: qkv (Q4_1), o (Q8_0), down (Q4_0); the untied LM head (Q8_0)
    assert loaded.weight_format == "float32; decode reads GGUF blocks (2 Q4_0, 2 Q4_1, 3 Q8_0)"
    lib = cpu_blocks.library(cache_root() / "kernels")
    for layer in model.layers:
        assert layer.mlp.gate_up_proj.blocks is None  # mixed kinds: not merged, fp32 kept
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            b = linear.blocks
            # the blocks stand for exactly the fp32 weight the model holds (merge, Q/K rows)
            assert torch.equal(cpu_blocks.dequantize(lib, b.blocks, b.kind, b.blocks.shape[1]
                                                     // cpu_blocks.BLOCK_BYTES[b.kind] * 32),
                               linear.weight)  # fmt: skip
            x1, x200 = (
                torch.randn(1, linear.weight.shape[1]),
                torch.randn(200, linear.weight.shape[1]),
            )
            assert torch.equal(linear.forward(x1), b(x1))  # decode rows read the blocks
            assert torch.equal(linear.forward(x200), F.linear(x200, linear.weight, linear.bias))
    assert (arch == "qwen2") == (model.layers[0].self_attn.qkv_proj.blocks.bias is not None)
    assert model.lm_head_blocks is not None and model.lm_head_blocks.kind == "q8_0"


def test_engine_tokens_equal_with_and_without_blocks(engine: Engine, monkeypatch) -> None:
    """The default model (Q4_1 projections, Q8_0 embedding) decodes from its blocks; greedy
    tokens equal those of its fp32 weights, at batch 1 and batched."""
    assert "GGUF blocks (120 Q4_1, 1 Q8_0)" in engine.loaded.weight_format
    layer = engine.loaded.model.layers[0]
    assert layer.self_attn.qkv_proj.blocks is not None and layer.mlp.down_proj.blocks is not None
    prompts = ["The capital of France is", "def fibonacci(n):", "Write a haiku about rain.",
               "List three prime numbers:", "Translate 'good morning' to Spanish:"]  # fmt: skip
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with_blocks = [o.token_ids for o in engine.generate(prompts, params)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts[:2]]
    monkeypatch.setenv("LLMCONSOLE_CPU_GGUF_BLOCKS", "0")
    fp32 = Engine(EngineConfig())
    try:
        assert "GGUF" not in fp32.loaded.weight_format
        assert fp32.loaded.model.layers[0].self_attn.qkv_proj.blocks is None
        assert [o.token_ids for o in fp32.generate(prompts, params)] == with_blocks
    finally:
        fp32.shutdown()
    assert alone == with_blocks[:2]
