"""Benchmark prompts of real text: windows of the shipped public-domain corpus.

Every prompt starts at a random offset of the tokenized corpus (wrapping around), so
prompts share no long prefix and a peer's prefix cache cannot shortcut a run; lengths
are drawn uniformly from [lo, hi]. The same seed gives the same workload.
"""
from __future__ import annotations

import random
from importlib import resources


def corpus_text() -> str:
    return resources.files("tuili.data").joinpath("corpus.txt").read_text(encoding="utf-8")


def parse_range(spec: str) -> tuple[int, int]:
    """'100-300' -> (100, 300); '128' -> (128, 128)."""
    try:
        parts = [int(x) for x in str(spec).split("-")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ValueError(f"length range: expected A-B with 1 <= A <= B, got {spec!r}")
    return parts[0], parts[1]


def random_prompts(tokenizer, num_prompts: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    ids = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    prompts = []
    for _ in range(num_prompts):
        n = rng.randint(lo, hi)
        start = rng.randrange(len(ids))
        prompts.append([ids[(start + i) % len(ids)] for i in range(n)])
    return prompts


def random_prompt_texts(tokenizer, num_prompts: int, lo: int, hi: int, seed: int) -> list[str]:
    """The same prompts as text, for clients that send strings (lengths are approximate after re-encoding)."""
    return [tokenizer.decode(p) for p in random_prompts(tokenizer, num_prompts, lo, hi, seed)]
