"""What the console changes in the Python interpreter while it is open, and gives back on close.

The engine thread shares the interpreter with the UI, and two interpreter-wide costs land on it:

- The GIL. The engine thread needs it between every two torch ops; with CPython's default 5 ms
  switch interval a busy UI makes each of those waits long. At 1 ms they are short.
- The cyclic garbage collector. Textual allocates many short-lived containers per repaint, so
  collections run often, and every so often a full one walks every tracked object in the
  process, the engine's and the telemetry ring's included: 150-190 ms with the GIL held on a
  small CPU, i.e. a stalled engine. Freezing the heap once it is built (`gc.freeze()`) keeps
  those long-lived objects out of every later collection.
"""

from __future__ import annotations

import gc
import sys

GIL_SWITCH_INTERVAL_S = 0.001


class ConsoleInterpreter:
    def __init__(self, switch_interval_s: float = GIL_SWITCH_INTERVAL_S) -> None:
        self._switch_interval_s = switch_interval_s
        self._saved_switch_interval: float | None = None
        self.frozen = False
        self._exited = False

    def enter(self) -> None:
        if self._saved_switch_interval is None:
            self._saved_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self._saved_switch_interval, self._switch_interval_s))

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
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
