"""How recordings/llama3-8b-h100-graphs.jsonl was made: the workshop's lesson, recorded headless.

Random Llama-3-8B weights on one GPU with --cuda-graph-max-bs 8; requests of 512 random prompt
tokens arrive in three waves: 4 at a time (decode replays CUDA graphs), 24 at a time (the batch
outgrows the largest graph: eager), then 8 again. Replay it with `llmconsole replay FILE`.

    python recordings/record_gpu_demo.py OUT.jsonl [--model llama-3-8b] [--cuda-graph-max-bs 8]
"""

from __future__ import annotations

import argparse
import queue
import random
import time
from pathlib import Path

from llmconsole.console.recording import SessionRecorder
from llmconsole.core import Delta, Engine, EngineConfig, SamplingParams


def wave(engine: Engine, concurrency: int, seconds: float, rng: random.Random) -> None:
    """Keep `concurrency` requests in flight for `seconds` (closed loop), then drain."""
    params = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
    vocab = engine.loaded.model_config.vocab_size
    finished: queue.SimpleQueue[str] = queue.SimpleQueue()
    in_flight = 0

    def sink(delta: Delta) -> None:  # on the engine thread: must not block
        if delta.finished:
            finished.put(delta.rid)

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        while in_flight < concurrency:
            prompt = [rng.randrange(100, vocab) for _ in range(512)]
            engine.submit(prompt, params, sink=sink)
            in_flight += 1
        finished.get()
        in_flight -= 1
    for _ in range(in_flight):
        finished.get()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    config = EngineConfig(
        model=args.model, load_format="dummy", cuda_graph_max_bs=args.cuda_graph_max_bs
    )
    engine = Engine(config)
    recorder = SessionRecorder(
        args.out, engine.subscribe(), engine.live_requests, engine.describe(), ""
    ).start()
    rng = random.Random(0)
    try:
        for concurrency in (4, 24, 8):
            engine.log_event("load", f"wave: {concurrency} requests in flight")
            wave(engine, concurrency, args.seconds, rng)
    finally:
        engine.shutdown()
        recorder.stop()


if __name__ == "__main__":
    main()
