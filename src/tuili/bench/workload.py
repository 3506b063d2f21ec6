"""Benchmark prompts of real text: windows of the shipped public-domain corpus.

Every prompt starts at a random offset of the tokenized corpus (wrapping around), so
prompts share no long prefix and a peer's prefix cache cannot shortcut a run; lengths
are drawn uniformly from [lo, hi]. The same seed gives the same workload. Every command
that builds prompts from the corpus (serve, throughput, decode, multiturn, the peers
harness) cuts them with `corpus_window`.
"""
from __future__ import annotations

import random
from pathlib import Path


from ..data import corpus_text


def corpus_ids(tokenizer) -> list[int]:
    """The whole corpus as token ids (no special tokens)."""
    return tokenizer(corpus_text(), add_special_tokens=False).input_ids


def corpus_window(ids: list[int], rng: random.Random, n: int) -> list[int]:
    """`n` tokens of `ids` from an offset drawn from `rng`, wrapping around the end."""
    start = rng.randrange(len(ids))
    return [ids[(start + i) % len(ids)] for i in range(n)]


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
    ids = corpus_ids(tokenizer)
    prompts = []
    for _ in range(num_prompts):
        n = rng.randint(lo, hi)
        prompts.append(corpus_window(ids, rng, n))
    return prompts


def random_prompt_texts(tokenizer, num_prompts: int, lo: int, hi: int, seed: int) -> list[str]:
    """The same prompts as text, for clients that send strings (lengths are approximate after re-encoding)."""
    return [tokenizer.decode(p) for p in random_prompts(tokenizer, num_prompts, lo, hi, seed)]


def load_tokenizer(name: str):
    """The tokenizer of an HF folder or of a known model name (converted into the cache on first use)."""
    from ..engine.tokenizer import load_tokenizer as load_folder_tokenizer
    from ..model.loader import resolve_model_path

    path = Path(name)
    if not path.is_dir():
        path = Path(resolve_model_path(name))
    tokenizer = load_folder_tokenizer(path, name)
    if tokenizer is None:
        raise ValueError(f"tokenizer: {name} has no tokenizer files")
    return tokenizer
