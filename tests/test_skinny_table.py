"""The skinny GEMM's per-card table of tuned launch shapes (kernels/skinny_table.py), the tuner's
search space (kernels/skinny_tune.py) and `llmconsole bench tune-gemm`'s checks. The timing
itself needs a GPU: `-m gpu` runs the engine's use of a table on one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmconsole.console import cli
from llmconsole.console.bench_tune import products_of
from llmconsole.core.models.config import ModelConfig
from llmconsole.core.models.dummy_shapes import dummy_config
from llmconsole.core.models.llama import LlamaForCausalLM
from llmconsole.kernels import skinny_table as st
from llmconsole.kernels.skinny_table import SkinnyConfig, SkinnyTable, TunedEntry
from llmconsole.kernels.skinny_tune import candidates, matches, row_ranges, splits_for, wins

H100 = "NVIDIA H100 80GB HBM3"
CFG = SkinnyConfig(128, 64, 128, 4, 4, split_k=2)


def entry(op: str = "gemm", n: int = 4096, k: int = 4096, rows: tuple[int, int] = (65, 128)):
    return TunedEntry(op, n, k, rows[0], rows[1], CFG, 20.0, 24.0)


def test_lookup_finds_the_entry_for_the_rows_and_weight_shape_only() -> None:
    wide = TunedEntry("silu_mul", 28672, 4096, 65, 96, SkinnyConfig(128, 64, 64, 8, 3), 60, 70)
    table = SkinnyTable(H100, (entry(), entry(rows=(129, 256)), wide))
    assert table.lookup("gemm", 65, 4096, 4096) == CFG
    assert table.lookup("gemm", 200, 4096, 4096) == CFG
    assert table.lookup("gemm", 64, 4096, 4096) is None  # the built-in rules' rows
    assert table.lookup("gemm", 257, 4096, 4096) is None
    assert table.lookup("gemm", 128, 4096, 14336) is None  # another weight
    assert table.lookup("silu_mul", 96, 28672, 4096) == wide.config
    assert table.lookup("gemm", 96, 28672, 4096) is None  # the fused op is its own entry


def test_a_table_survives_its_json_and_newer_entries_replace_what_they_overlap(
    tmp_path: Path,
) -> None:
    table = SkinnyTable(H100, (entry(), entry(n=6144)), "llmconsole bench tune-gemm --rows 128")
    path = tmp_path / st.file_name(H100)
    table.save(path)
    assert path.name == "NVIDIA_H100_80GB_HBM3.json"
    assert SkinnyTable.load(path) == table
    faster = TunedEntry("gemm", 4096, 4096, 97, 128, SkinnyConfig(128, 128, 64, 8, 3), 18, 24)
    merged = table.merged(SkinnyTable(H100, (faster,)))
    assert merged.lookup("gemm", 128, 4096, 4096) == faster.config
    assert merged.lookup("gemm", 80, 4096, 4096) is None  # the old 65-128 entry went
    assert merged.lookup("gemm", 80, 6144, 4096) == CFG  # untouched


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not json", "not a skinny GEMM table"),
        ('{"format": 9, "device": "x", "entries": []}', "format 9"),
        ('{"format": 1, "device": "x"}', "entries"),
        (
            '{"format": 1, "device": "x", "entries": [{"op": "conv", "n": 1, "k": 1, '
            '"min_rows": 2, "max_rows": 4, "config": {"block_m": 16, "block_n": 16, '
            '"block_k": 16, "num_warps": 4, "num_stages": 3}, "us": 1, "baseline_us": 1}]}',
            "unknown op 'conv'",
        ),
    ],
)
def test_a_bad_table_file_is_a_clear_error_naming_it(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=says) as err:
        SkinnyTable.load(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="cannot read"):
        SkinnyTable.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="overlap"):
        SkinnyTable(H100, (entry(), entry(rows=(100, 200))))


def test_the_engine_reads_the_env_table_else_the_shipped_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(st, "SHIPPED_DIR", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    monkeypatch.delenv(st.TUNING_ENV, raising=False)
    assert st.table_source(H100) is None  # nothing shipped for this card
    SkinnyTable(H100, (entry(),)).save(tmp_path / "shipped" / st.file_name(H100))
    assert st.table_source(H100) == tmp_path / "shipped" / st.file_name(H100)
    monkeypatch.setenv(st.TUNING_ENV, str(tmp_path / "mine.json"))
    assert st.table_source(H100) == tmp_path / "mine.json"
    monkeypatch.setenv(st.TUNING_ENV, "off")
    assert st.table_source(H100) is None


def test_shipped_tables_parse_and_name_their_card() -> None:
    for path in st.SHIPPED_DIR.glob("*.json"):
        table = SkinnyTable.load(path)
        assert st.file_name(table.device) == path.name
        assert table.command.startswith("llmconsole bench tune-gemm")
        assert all(e.us < e.baseline_us for e in table.entries)


def test_row_ranges_cover_the_rows_above_the_built_in_rules_without_gaps() -> None:
    assert row_ranges([128, 96]) == [(65, 96), (97, 128)]
    assert row_ranges([256]) == [(65, 256)]
    assert row_ranges([32, 64]) == [(2, 32), (33, 64)]  # tuning below 65 overrides the rules
    with pytest.raises(ValueError, match="at least 2"):
        row_ranges([1, 8])


def test_candidates_fit_the_card_and_fill_its_sms() -> None:
    smem, sms = 227 * 1024, 132
    for op, n, k in (("gemm", 6144, 4096), ("gemm", 4096, 14336), ("silu_mul", 28672, 4096)):
        found = candidates(op, 128, n, k, sms, smem)
        assert len(found) >= 8
        for c in found:
            w_rows = c.block_n * (2 if op == "silu_mul" else 1)
            assert c.block_m == 128
            assert c.num_stages * (c.block_m + w_rows) * c.block_k * 2 <= smem
            assert c.block_m * w_rows <= 128 * c.num_warps * 32  # fp32 accumulators fit
            cols = n // 2 if op == "silu_mul" else n
            programs = -(-cols // c.block_n) * c.split_k
            assert c.split_k == 1 or programs >= sms  # a split is there to fill the card
            assert op == "gemm" or c.split_k == 1  # SiLU does not distribute over K slices
    # A weight wide enough to fill the SMs is not split; a narrow one is, to one and two waves.
    assert splits_for(1002, 4096, 128, sms) == (1,)
    assert splits_for(64, 4096, 64, sms) == (3, 5)
    assert splits_for(16, 256, 64, sms) == (2,)  # K too short for more slices
    assert len(candidates("gemm", 128, 4096, 4096, sms, 99 * 1024)) < len(
        candidates("gemm", 128, 4096, 4096, sms, smem)
    )  # a card with less shared memory gets fewer deep pipelines


def test_a_shape_is_kept_only_when_faster_by_the_margin_and_right() -> None:
    assert wins(96.0, 100.0, 0.03) and wins(97.0, 100.0, 0.03)
    assert not wins(97.5, 100.0, 0.03)  # faster, but within the margin: noise, not a win
    assert not wins(101.0, 100.0, 0.0)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, generator=gen), torch.randn(32, 64, generator=gen)
    want = x @ w.t()
    assert matches((x.bfloat16() @ w.bfloat16().t()), want)  # bf16 rounding passes
    wrong = want.clone()
    wrong[3, 5] += 0.1 * want.abs().max()  # one element off: a broken launch shape
    assert not matches(wrong, want)


def test_tuned_products_are_the_weights_the_model_multiplies_by() -> None:
    mc = ModelConfig.from_hf(dummy_config("tiny-llama"))
    model = LlamaForCausalLM(mc)
    layer = model.layers[0]
    weights = {
        "qkv": layer.self_attn.qkv_proj.weight,
        "o": layer.self_attn.o_proj.weight,
        "gate_up": layer.mlp.gate_up_proj.weight,
        "gate_up+silu": layer.mlp.gate_up_proj.weight,
        "down": layer.mlp.down_proj.weight,
        "lm_head": model.lm_head_weight,
    }
    products = products_of(mc)
    assert {p.name for p in products} == set(weights)
    for p in products:
        assert (p.n, p.k) == tuple(weights[p.name].shape), p.name
    llama3 = {
        p.name: (p.n, p.k) for p in products_of(ModelConfig.from_hf(dummy_config("llama-3-8b")))
    }
    assert llama3["qkv"] == (6144, 4096) and llama3["down"] == (4096, 14336)


@pytest.fixture(scope="module")
def invoke():
    if not any(c.name == "tune-gemm" for c in cli.bench_app.registered_commands):
        cli._register_bench()
    runner = CliRunner()
    return lambda *args: runner.invoke(cli.app, ["bench", "tune-gemm", *args])


def test_tune_gemm_refuses_bad_input_with_a_one_line_error(invoke) -> None:
    """A CliError is what `llmconsole` prints as one line, without a traceback."""
    cases = [
        (("--rows", "1"), "--rows must be >= 2"),
        (("--margin", "0.7"), "--margin must be in [0, 0.5)"),
        (("--rows", "96", "x"), "unexpected argument 'x'"),
    ]
    if not torch.cuda.is_available():
        cases.append(((), "no CUDA GPU here"))
    for args, says in cases:
        result = invoke(*args)
        assert isinstance(result.exception, cli.CliError), result.output
        assert says in str(result.exception)
