"""How decode attention cuts each request's KV into splits: pure rules, checked on CPU."""

from __future__ import annotations

import pytest

from llmconsole.kernels import decode_attention as da

H100_SMS = 132


def test_an_h100_sm_holds_five_large_batch_programs_by_its_shared_memory() -> None:
    assert da.stage1_resident(H100_SMS) == 5  # 228 KB / (38.9 + 1) KB
    assert da.stage1_resident(H100_SMS, smem_per_sm=167936) == 4  # an A100's 164 KB
    assert da.stage1_resident(H100_SMS, regs_per_sm=16384) == 1  # never below one


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
