"""Response bodies and stream chunks in OpenAI's shapes, built from engine outputs.

The engine hands out deltas (only what is new; text that might be the start of a stop
string held back until it is known not to be one), so a stream chunk is one delta.
"""
from __future__ import annotations

import time
from typing import Any

from ..engine import RequestOutput, TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class TokenText:
    """Token id -> its text, cached (decoding one token at a time is the OpenAI convention)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)
            self.cache[token_id] = text
        return text


def completion_logprobs(entries: list[TokenLogprob], tok: TokenText, offset: int) -> dict[str, Any]:
    """The legacy completions form: parallel lists plus text offsets."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        text = tok(e.token_id)
        tokens.append(text)
        lps.append(e.logprob)
        tops.append({tok(t): lp for t, lp in e.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], tok: TokenText) -> dict[str, Any]:
    def item(token_id: int, lp: float) -> dict[str, Any]:
        text = tok(token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, Any],
               logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, created: int, model: str, obj: str, use: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def finish_reason(reason: str | None) -> str:
    return "stop" if reason in ("stop", "abort") else (reason or "length")


def now() -> int:
    return int(time.time())


def totals(outputs: list[RequestOutput]) -> tuple[int, int, int]:
    """(prompt tokens, completion tokens, cached prompt tokens) over a response's prompts."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return prompt, completion, cached
