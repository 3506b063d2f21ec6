"""Labelled router data: JSON lines of {"prompt" or "messages", "label": "easy"|"hard", "max_tokens"?}.

A malformed line is a ValueError naming the file and line number, so `tuili router train`
ends with one clear line instead of a traceback.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .features import conversation, extract

LABELS = {"easy": 0, "hard": 1}


@dataclass
class Example:
    prompt: str | None
    messages: list[dict[str, Any]] | None
    label: int  # 1 = hard
    max_tokens: int | None = None
    category: str | None = None

    def features(self) -> list[float]:
        return extract(conversation(self.prompt, self.messages), self.max_tokens)


def load_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    examples = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object")
        label = row.get("label")
        if label not in LABELS:
            raise ValueError(f"{where}: label must be 'easy' or 'hard', got {label!r}")
        prompt, messages = row.get("prompt"), row.get("messages")
        if (prompt is None) == (messages is None):
            raise ValueError(f"{where}: give exactly one of 'prompt' or 'messages'")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        if messages is not None and not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
            raise ValueError(f"{where}: 'messages' must be a list of objects")
        max_tokens = row.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"{where}: 'max_tokens' must be a positive integer")
        examples.append(Example(prompt, messages, LABELS[label], max_tokens, row.get("category")))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples
