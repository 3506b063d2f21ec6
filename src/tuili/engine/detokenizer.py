"""Incremental detokenization and stop-string handling.

Text grows by decoding a short window of recent tokens twice (before and after the new
token) and keeping the difference, so each step costs O(1) tokenizer work and multi-byte
characters split across tokens only appear once complete (no U+FFFD in streamed text).
"""
from __future__ import annotations

from .sequence import Sequence


def update_text(tokenizer, seq: Sequence, skip_special_tokens: bool = True, final: bool = False) -> str:
    """Append the text of the newest tokens to `seq.text`; returns the added text.

    `final` flushes an incomplete character instead of waiting for the next token."""
    if tokenizer is None:
        return ""
    ids = seq.token_ids
    prefix = tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
        return ""
    delta = full[len(prefix):]
    seq.prefix_offset = seq.read_offset
    seq.read_offset = len(ids)
    seq.text += delta
    return delta


def find_stop(text: str, delta_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends within the newly added text: (index in text, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(len(text) - delta_len - len(stop) + 1, 0)
        i = text.find(stop, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best
