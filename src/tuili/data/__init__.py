"""Data files shipped with tuili (a public-domain text corpus)."""
from __future__ import annotations

from pathlib import Path

CORPUS = Path(__file__).with_name("corpus.txt")


def corpus_text() -> str:
    """The shipped public-domain corpus: the default text for perplexity and benchmark prompts."""
    return CORPUS.read_text(encoding="utf-8")
