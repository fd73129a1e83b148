"""Give a thread's idle OpenMP workers back, so the engine thread's products run at full speed.

torch's CPU kernels (and MKL inside them) run on GNU OpenMP. Every thread that runs a parallel
op becomes the master of its own team and keeps that team's worker threads parked for reuse.
libgomp counts all of them, and once they outnumber the CPUs it stops letting workers spin
between parallel regions: each one sleeps on a futex and is woken for the next region. A decode
step is ~120 short parallel regions, so a team left behind by another thread (the caller's, which
loaded the model; a transformers run in the same process) made the engine thread's batch-1 step
~1.8x slower on the 2-core CPU box (80 -> 45 ms a token, same process, same weights).

OpenMP 5.0's `omp_pause_resource_all(omp_pause_soft)` frees the calling thread's pool in
libgomp. Only the owner can free its pool, so each thread gives back its own: the caller once it
has built the engine, the engine thread whenever it goes idle. The next parallel op re-creates
the workers (a thread start each, microseconds). No-op where libgomp is not in the process (a
torch built on another OpenMP runtime, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: keep the runtime, drop the idle threads


@functools.cache
def _pause_all() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` of the libgomp already loaded here, or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:  # RTLD_NOLOAD: never load a second OpenMP runtime, only find the one in use
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            fn = lib.omp_pause_resource_all
        except (OSError, AttributeError):  # not loaded after all, or older than OpenMP 5.0
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def release_omp_workers() -> bool:
    """Free the calling thread's parked OpenMP workers; True if the runtime took the request.

    Call it outside any parallel region, on a thread that will not compute again soon."""
    fn = _pause_all()
    return fn is not None and fn(_OMP_PAUSE_SOFT) == 0
