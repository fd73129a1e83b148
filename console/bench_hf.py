"""The transformers reference for `bench offline --compare-hf`: transformers' own model and
generate() on the same token ids, greedy, exactly --max-tokens new tokens per row."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from llmconsole.core.cpu_threads import release_omp_workers

from .bench_common import err, fail, progress_bar
from .bench_runs import RunStats

if TYPE_CHECKING:
    from llmconsole.core import Engine


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence generate()'s warnings about the model's sampling defaults and the loading bar."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # its tqdm bar would fight with ours on stderr
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class HFReference:
    """transformers' own model and generate(), on the engine's device and dtype."""

    def __init__(self, engine: Engine) -> None:
        source = engine.loaded.source
        if source.path is None or source.kind == "dummy":
            fail("--compare-hf needs real weights on disk (not a dummy model)")
        import torch
        from transformers import AutoModelForCausalLM

        self.device = engine.loaded.device
        with err.status("loading the transformers reference model"), _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=engine.loaded.dtype)
        self.model = model.to(self.device).eval()
        # Padding is masked out, so any id works; prefer the tokenizer's pad, then EOS.
        pad = getattr(engine.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(engine.tokenizer, "eos_token_id", None)
        if pad is None:
            eos = self.model.generation_config.eos_token_id
            pad = eos[0] if isinstance(eos, list) else eos
        self.pad_id = int(pad if pad is not None else 0)
        self._torch = torch
        release_omp_workers()  # the load's OpenMP workers would slow the engine thread

    def _generate(self, group: Sequence[list[int]], new_tokens: int) -> int:
        """Left-padded batch with an attention mask; returns the new tokens per row."""
        torch = self._torch
        width = max(len(p) for p in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, prompt in enumerate(group):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        with torch.inference_mode(), _quiet_transformers():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=self.pad_id,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return int(out.shape[1]) - width

    def run(self, prompts: list[list[int]], max_tokens: int, batch: int) -> RunStats:
        batch = min(batch, len(prompts))
        groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        self._generate(groups[0], 2)  # warm-up at the measured batch size, not timed
        output_tokens = 0
        with progress_bar() as bar:
            task = bar.add_task(f"transformers b={batch}", total=len(prompts) * max_tokens)
            started = time.perf_counter()
            for group in groups:
                new = self._generate(group, max_tokens)
                if new != max_tokens:
                    fail(f"transformers generated {new} tokens per row, not {max_tokens}")
                output_tokens += new * len(group)
                bar.advance(task, new * len(group))
            seconds = time.perf_counter() - started
        # Parked OpenMP workers of this thread would slow the engine's next round (see
        # llmconsole.core.cpu_threads); the engine thread gives its own back while idle.
        release_omp_workers()
        return RunStats(
            system="transformers",
            batch=batch,
            num_prompts=len(prompts),
            input_tokens=sum(len(p) for p in prompts),
            output_tokens=output_tokens,
            seconds=seconds,
        )
