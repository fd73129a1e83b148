"""How decode attention cuts each request's KV into splits: pure rules, checked on CPU."""

from __future__ import annotations

import pytest

from llmconsole.kernels import decode_attention as da

H100_SMS = 132


def test_an_h100_sm_holds_five_large_batch_programs_by_its_shared_memory() -> None:
    assert da.stage1_resident() == 5  # 228 KB / (38.9 + 1) KB
    assert da.stage1_resident(smem_per_sm=167936) == 4  # an A100's 164 KB
    assert da.stage1_resident(regs_per_sm=16384) == 1  # never below one


def test_wave_cost_charges_a_thin_last_wave_as_a_fuller_one() -> None:
    assert da.wave_cost(660, 660) == pytest.approx(1.0)  # exactly one full wave
    assert da.wave_cost(1024, 660) == pytest.approx(1.0)  # last wave 55% full: no loss
    assert da.wave_cost(512, 660) == pytest.approx(1.0)  # one partial wave, most slots busy
    assert da.wave_cost(768, 660) > 1.1  # batch 96: a 16% tail costs a 30% wave
    assert da.wave_cost(100, 660) > 1.9  # a lone thin wave


@pytest.mark.parametrize(
    ("batch", "splits"),
    [(64, 1), (96, 2), (128, 1), (256, 2)],  # the best or within 0.3% of it in the H100 sweep
)
def test_large_batches_take_the_splits_that_leave_the_least_idle_tail(
    batch: int, splits: int
) -> None:
    assert da.decode_num_splits(batch, 8, 1024, H100_SMS, resident=5) == splits


def test_small_batches_keep_about_two_programs_per_sm_and_short_kv_caps_splits() -> None:
    assert da.decode_num_splits(1, 8, 4096, H100_SMS) == 33  # cdiv(264, 8)
    assert da.decode_num_splits(1, 8, 4096 * 64, 4) == 1  # 4 SMs: 8 programs already fill them
    assert da.decode_num_splits(8, 8, 1024, H100_SMS) == 5
    assert da.decode_num_splits(1, 8, 100, H100_SMS) == 2  # only 2 blocks of KV
    assert da.decode_num_splits(96, 8, 64, H100_SMS) == 1  # one block: nothing to split


def _stage1_for_sm90() -> tuple[int, int]:
    """(registers a thread, shared bytes) of stage 1 at batch 32+, compiled for sm_90 here as a
    bf16 Llama-3-8B launch specialises it (16-byte aligned pointers and strides)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("this Triton ships no cuobjdump")
    names = ["q", "k_pool", "v_pool", "slots", "rows", "kv_lens", "mid_o", "mid_lse"]
    kinds = ["*bf16"] * 3 + ["*i32"] * 3 + ["*fp32"] * 2
    sig = {f"{n}_ptr": t for n, t in zip(names, kinds, strict=True)}
    strides = ["stride_qb", "stride_qh", "stride_pool_slot", "stride_pool_head", "stride_slots"]
    sig |= dict.fromkeys(strides, "i32") | {"qk_scale": "fp32", "num_splits": "i32", "group": "i32"}
    consts = {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_G": 16, "BLOCK_N": da._TILE["block_n"]}
    consts |= {"PRECISION": "tf32", "HAS_ROWS": True, "USE_PDL": True}
    sig |= dict.fromkeys(consts, "constexpr")
    order = list(sig)
    aligned = [i for i, n in enumerate(order) if n.endswith("_ptr") or n.startswith("stride")]
    src = ASTSource(
        fn=da._decode_stage1,
        signature=sig,
        constexprs={(order.index(k),): v for k, v in consts.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    options = {"num_warps": da._TILE["warps"], "num_stages": da._LARGE_BATCH_STAGES}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stage1.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+)", usage)
    assert found, usage
    return int(found.group(1)), int(kernel.metadata.shared)


def test_the_wave_models_programs_per_sm_are_those_of_the_compiled_kernel() -> None:
    """The occupancy `stage1_resident` assumes (from _STAGE1_REGS / _STAGE1_SMEM) is what the
    shipped tile compiles to for an H100, so a tile change cannot silently skew the split rule."""
    regs, smem = _stage1_for_sm90()
    assert da.stage1_resident(regs=regs, smem=smem) == da.stage1_resident(), (regs, smem)
