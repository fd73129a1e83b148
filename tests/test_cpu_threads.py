"""OpenMP workers on the CPU: the caller gives back the build's, the engine thread its own when
idle (see llmconsole.core.cpu_threads). Parked workers of another thread make GNU OpenMP put
every worker to sleep between parallel regions, which slowed batch-1 decode ~1.8x here.

Thread counts are per process, so the checks run in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmconsole.core.cpu_threads import release_omp_workers

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or not release_omp_workers(),
    reason="needs Linux and GNU OpenMP (torch's CPU wheels)",
)

_CHECK = textwrap.dedent(
    """
    import json, os, threading, time
    import torch
    from llmconsole.core import Engine, EngineConfig, SamplingParams
    from llmconsole.core.cpu_threads import release_omp_workers

    torch.set_num_threads(2)

    def threads():
        return len(os.listdir("/proc/self/task"))

    def parallel_op():  # 4M elements: an OpenMP region on two threads
        torch.ones(1 << 22).mul_(2)

    parallel_op()  # the caller already holds a team, as after any torch work
    engine = Engine(EngineConfig(model="smollm2-135m", load_format="dummy", max_total_tokens=256))
    before = threads()
    parallel_op()
    caller_spawned = threads() - before  # 1: no parked worker was left to reuse
    release_omp_workers()
    # Threads are counted every millisecond from a sampler thread of its own: sampling only as
    # deltas arrive can miss a team that comes and goes between two bursts of them.
    done = threading.Event()
    seen = [0]

    def sample():
        while not done.is_set():
            seen[0] = max(seen[0], threads())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(0.05)
    idle_with_sampler = threads()
    params = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0)
    for _ in engine.submit([1, 2, 3, 4, 5, 6], params):
        pass
    done.set()
    sampler.join()
    seen = seen[0] - 1  # without the sampler
    idle = idle_with_sampler - 1
    deadline = time.monotonic() + 10
    while threads() != idle and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps({
        "caller_spawned": caller_spawned,
        "engine_spawned": seen - idle,
        "engine_left": threads() - idle,
    }))
    engine.shutdown()
    """
)


def test_engine_keeps_no_idle_openmp_workers_parked() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    # Engine() gave back the workers its build (and the caller before it) parked on this thread.
    assert counts["caller_spawned"] == 1
    # The engine thread ran its decode steps on a team of its own, and let it go when idle.
    assert counts["engine_spawned"] >= 1
    assert counts["engine_left"] == 0


def test_release_is_harmless_with_nothing_parked() -> None:
    """Twice in a row, and on a thread that never ran a parallel op: no error, torch works."""
    import threading

    import torch

    results: list[bool] = []
    worker = threading.Thread(
        target=lambda: results.extend([release_omp_workers(), release_omp_workers()])
    )
    worker.start()
    worker.join()
    assert results == [True, True]
    assert release_omp_workers() and release_omp_workers()
    x = torch.arange(1 << 20, dtype=torch.float32)
    assert float(x.mul(2).sum()) == float(2 * x.sum())
