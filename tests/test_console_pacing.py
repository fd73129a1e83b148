"""The console's paint pacer: repaints as often as the UI thread's CPU budget allows."""

from __future__ import annotations

import pytest

from llmconsole.console.pacing import (
    BUDGET,
    SMALL_MACHINE_BUDGET,
    PaintBudget,
    PaintPacer,
    budget_for,
)

BUDGET_1PCT = PaintBudget(share=0.01, min_interval=0.5, max_interval=2.0, chart_interval=4.0)


class FakeClocks:
    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 5.0

    def run(self, wall: float, cpu: float = 0.0) -> None:
        self.wall += wall
        self.cpu += cpu


def pacer(budget: PaintBudget = BUDGET_1PCT) -> tuple[PaintPacer, FakeClocks]:
    clocks = FakeClocks()
    return PaintPacer(budget, lambda: clocks.wall, lambda: clocks.cpu), clocks


def paints_over(p: PaintPacer, clocks: FakeClocks, seconds: float, paint_cpu: float) -> int:
    """Tick at 10 Hz for `seconds`; every paint costs `paint_cpu` of the UI thread's CPU."""
    paints = 0
    for _ in range(round(seconds * 10)):
        if p.due():
            p.painted()
            paints += 1
            clocks.run(0.0, paint_cpu)
        clocks.run(0.1)
    return paints


def test_the_first_tick_paints_with_the_chart() -> None:
    p, _ = pacer()
    assert p.due()
    assert p.painted() is True


def test_a_costly_paint_delays_the_next_until_it_fits_the_budget() -> None:
    p, clocks = pacer()
    p.painted()
    clocks.run(0.0, 0.012)  # a 12 ms paint at 1% of a core: the next one 1.2 s later
    clocks.run(1.1)
    assert not p.due()
    clocks.run(0.1)
    assert p.due()


def test_cheap_paints_never_come_faster_than_the_minimum_interval() -> None:
    p, clocks = pacer()
    p.painted()
    clocks.run(0.4)
    assert not p.due()
    clocks.run(0.1)
    assert p.due()


def test_the_screen_repaints_within_the_maximum_interval_however_costly() -> None:
    p, clocks = pacer()
    p.painted()
    clocks.run(0.0, 0.5)  # e.g. a modal screen's layout
    clocks.run(1.9)
    assert not p.due()
    clocks.run(0.1)
    assert p.due()


def test_forgiven_one_off_work_does_not_hold_back_the_next_paint() -> None:
    p, clocks = pacer()
    p.painted()
    clocks.run(0.1, 0.3)  # e.g. freezing the heap after startup
    p.forgive()
    clocks.run(0.4)
    assert p.due()


def test_the_ui_threads_average_share_stays_within_the_budget() -> None:
    p, clocks = pacer()
    paints = paints_over(p, clocks, 60.0, paint_cpu=0.008)
    assert 0.01 * 60.0 / 0.008 * 0.8 <= paints <= 0.01 * 60.0 / 0.008  # ~75 paints, not 600
    assert (clocks.cpu - 5.0) / 60.0 <= 0.01


def test_the_chart_redraws_at_its_own_slower_interval() -> None:
    p, clocks = pacer()
    charts = 0
    for _ in range(200):  # 20 s at 10 Hz, cheap paints: one every 0.5 s
        if p.due():
            charts += p.painted()
        clocks.run(0.1)
    assert charts == 5  # at 0, 4, 8, 12 and 16 s


def test_small_machines_get_the_tighter_budget() -> None:
    assert budget_for(2) is SMALL_MACHINE_BUDGET and budget_for(None) is SMALL_MACHINE_BUDGET
    assert budget_for(16) is BUDGET
    assert SMALL_MACHINE_BUDGET.share < BUDGET.share


@pytest.mark.parametrize(
    "kwargs",
    [
        {"share": 0.0},
        {"share": 1.5},
        {"min_interval": 0.0},
        {"min_interval": 3.0, "max_interval": 2.0},
    ],
)
def test_an_impossible_budget_is_refused(kwargs: dict[str, float]) -> None:
    args = {"share": 0.01, "min_interval": 0.5, "max_interval": 2.0, "chart_interval": 4.0}
    with pytest.raises(ValueError):
        PaintBudget(**(args | kwargs))
