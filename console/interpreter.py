"""What the console changes in the Python interpreter while it is open, and gives back on close.

The engine thread shares the interpreter with the UI, and two interpreter-wide costs land on it:

- The GIL. The engine thread needs it between every two torch ops; with CPython's default 5 ms
  switch interval a busy UI makes each of those waits long. At 1 ms they are short.
- The cyclic garbage collector. Textual allocates many short-lived containers per repaint, so
  collections run often, and every so often a full one walks every tracked object in the
  process, the engine's and the telemetry ring's included: 150-190 ms with the GIL held on a
  small CPU, i.e. a stalled engine. Freezing the heap once it is built (`gc.freeze()`) keeps
  those long-lived objects out of every later collection.
- The CPU. On a small machine the engine thread and torch's OpenMP worker fill every core, and
  the workers spin between parallel regions (see llmconsole.core.cpu_threads), so each slice
  the UI thread takes comes out of a decode step, and a worker preempted mid-region holds up
  the engine thread at the region's end. The UI thread runs at a lower priority (nice +10,
  Linux only) while the console is open: it still gets the CPU it needs to paint, but as the
  scheduler's last pick. 2-core box, `bench console` (16 rounds, same process): console/
  headless median 0.923 at the same priority, 0.979 / 0.980 / 0.984 lowered (three runs).
"""

from __future__ import annotations

import gc
import os
import sys
import threading

GIL_SWITCH_INTERVAL_S = 0.001
UI_NICE = 10  # added to the UI thread's nice value while the console is open (max 19)


class ConsoleInterpreter:
    def __init__(
        self, switch_interval_s: float = GIL_SWITCH_INTERVAL_S, ui_nice: int = UI_NICE
    ) -> None:
        self._switch_interval_s = switch_interval_s
        self._saved_switch_interval: float | None = None
        self._ui_nice = ui_nice
        self._niced: tuple[int, int] | None = None  # (native thread id, its nice before)
        self.frozen = False
        self._exited = False

    def enter(self) -> None:
        """Call on the UI thread: it is the one whose priority goes down."""
        if self._saved_switch_interval is None:
            self._saved_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self._saved_switch_interval, self._switch_interval_s))
        if self._niced is None and self._ui_nice > 0 and sys.platform.startswith("linux"):
            tid = threading.get_native_id()  # Linux: a thread's own nice value, by its id
            try:
                before = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(before + self._ui_nice, 19))
            except OSError:
                return  # not allowed here: the console runs at the priority it has
            self._niced = (tid, before)

    def freeze_heap(self) -> int:
        """Move every object alive now out of the collector's reach; call once the long-lived
        state exists (the screen built, the engine loaded). Returns how many are frozen (0 once
        `exit` has run: a late callback must not freeze a closed console's heap)."""
        if self._exited:
            return 0
        gc.collect()  # what is garbage now is freed, not frozen
        gc.freeze()
        self.frozen = True
        return gc.get_freeze_count()

    def exit(self) -> None:
        """Back to the interpreter as it was: the switch interval, and a heap the collector sees
        whole again (objects frozen by the console and freed since are collected later)."""
        self._exited = True
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None
        if self._niced is not None:
            tid, before = self._niced
            self._niced = None
            try:
                os.setpriority(os.PRIO_PROCESS, tid, before)
            except OSError:  # raising a priority needs CAP_SYS_NICE or RLIMIT_NICE: stays low
                pass
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
