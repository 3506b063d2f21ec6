"""Prompts for the peers runs: the same lengths every run, fresh text every run.

A peer with a prefix cache (llama-server's slots, vLLM's automatic prefix caching, tuili's
own) serves a repeated prompt from its cache, so the second run of a workload would be
faster than the first. Lengths are drawn from one seed shared by all runs (the workload
stays the same) and each run draws its windows of the corpus from its own seed.
"""
from __future__ import annotations

import random

from tuili.bench.workload import corpus_ids, corpus_window


def prompt_lengths(num_prompts: int, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(num_prompts)]


def fresh_prompt_ids(ids: list[int], lengths: list[int], text_seed: int) -> list[list[int]]:
    """One window of the tokenized corpus per length, at offsets drawn from `text_seed` (wrapping)."""
    rng = random.Random(text_seed)
    return [corpus_window(ids, rng, n) for n in lengths]


class PromptSource:
    """Tokenizes the corpus once; `texts(run)` gives run `run`'s prompts as text."""

    def __init__(self, tokenizer, num_prompts: int, lo: int, hi: int, length_seed: int = 0):
        self.tokenizer = tokenizer
        self.ids = corpus_ids(tokenizer)
        self.lengths = prompt_lengths(num_prompts, lo, hi, length_seed)

    def texts(self, run: int, num_prompts: int | None = None) -> list[str]:
        lengths = self.lengths[:num_prompts] if num_prompts else self.lengths
        return [self.tokenizer.decode(p) for p in fresh_prompt_ids(self.ids, lengths, 1_000_003 * (run + 1))]
