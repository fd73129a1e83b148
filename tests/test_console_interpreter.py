"""What the console changes in the interpreter while it is open, and gives back on close."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

import pytest

from llmconsole.console.interpreter import ConsoleInterpreter


def test_the_switch_interval_is_short_while_open_and_restored_on_close() -> None:
    before = sys.getswitchinterval()
    interp = ConsoleInterpreter(switch_interval_s=0.0005)
    interp.enter()
    try:
        assert sys.getswitchinterval() == 0.0005
    finally:
        interp.exit()
    assert sys.getswitchinterval() == before


def test_the_heap_is_frozen_until_close_and_garbage_is_not_frozen() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a reference cycle: only the collector frees it

    interp = ConsoleInterpreter()
    interp.enter()
    kept = [Node()]
    Node()  # garbage at freeze time: collected, not frozen
    try:
        # (the count drifts as other threads free frozen objects: not compared exactly)
        assert interp.freeze_heap() > 0 and gc.get_freeze_count() > 0
        assert not any(type(o) is Node for o in gc.get_objects())  # frozen objects are hidden
        assert len(kept) == 1
    finally:
        interp.exit()
    assert gc.get_freeze_count() == 0
    assert sum(type(o) is Node for o in gc.get_objects()) == 1  # the kept one is back in view


def test_a_freeze_after_close_does_nothing() -> None:
    # The app schedules the freeze after its first paint; a console closed before then must
    # not leave the process with a frozen heap.
    interp = ConsoleInterpreter()
    interp.enter()
    interp.exit()
    assert interp.freeze_heap() == 0 and gc.get_freeze_count() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_ui_thread_runs_at_a_lower_priority_while_open_and_no_other_thread_does() -> None:
    def nice_of(tid: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, tid)

    me = threading.get_native_id()
    before = nice_of(me)
    other_tid: list[int] = []
    release = threading.Event()

    def other() -> None:  # stands for the engine thread
        other_tid.append(threading.get_native_id())
        release.wait(10)

    worker = threading.Thread(target=other)
    worker.start()
    while not other_tid:
        time.sleep(0.001)
    other_before = nice_of(other_tid[0])
    interp = ConsoleInterpreter(ui_nice=3)
    interp.enter()
    try:
        assert nice_of(me) == min(before + 3, 19)
        assert nice_of(other_tid[0]) == other_before
    finally:
        interp.exit()
        release.set()
        worker.join()
    if os.geteuid() == 0:  # giving a priority back needs privileges elsewhere
        assert nice_of(me) == before
