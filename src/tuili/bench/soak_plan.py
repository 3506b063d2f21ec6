"""The requests of `tuili bench soak`: a seeded mix of what clients send, good and bad.

Each request is drawn on its own from one `random.Random(seed)`, so the same seed gives
the same plan. About 5% are malformed (`MALFORMED` below: bodies a server must refuse
with a 4xx and survive), about 20% are streamed and abandoned by the client right after
their first chunk, and the rest are good requests, half chat and half completions, half
streamed. Prompts are word windows of the shipped corpus (no tokenizer needed), 8-64
words; answers are 4-48 tokens, greedy or sampled, so a run stays short on a CPU.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from .workload import corpus_text, corpus_window

MALFORMED_SHARE = 0.05
ABANDONED_SHARE = 0.20
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass
class SoakRequest:
    index: int
    endpoint: str  # "chat" or "completions"
    stream: bool
    abandon: bool = False  # close the connection after the first streamed chunk
    malformed: str = ""  # which malformation (MALFORMED's key), "" for a good request
    body: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None  # sent as-is instead of `body` (not JSON at all)

    @property
    def path(self) -> str:
        return ENDPOINTS[self.endpoint]

    def content(self) -> bytes:
        return self.raw if self.raw is not None else json.dumps(self.body).encode()


def _bad_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()[:-7] + b",,}"  # cut short, with a syntax error


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {**body, key: value}


def _drop_input(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("messages", "prompt")}


# Each turns a good body into a bad one (bytes: the raw body; dict: sent as JSON).
MALFORMED: dict[str, Callable[[dict[str, Any]], dict[str, Any] | bytes]] = {
    "bad_json": _bad_json,
    "max_tokens_string": _set("max_tokens", "12"),
    "temperature_bool": _set("temperature", False),
    "stream_string": _set("stream", "yes"),
    "unknown_model": _set("model", "no-such-model-soak"),
    "oversized_max_tokens": _set("max_tokens", 10**9),
    "negative_max_tokens": _set("max_tokens", -5),
    "missing_input": _drop_input,
    "input_wrong_type": lambda body: {**_drop_input(body), "messages" if "messages" in body else "prompt": 42},
    "body_not_object": lambda body: json.dumps([body]).encode(),
}


def _good_body(endpoint: str, model: str, prompt: str, rng: random.Random, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(4, 48), "stream": stream,
                            "temperature": rng.choice([0.0, 0.8])}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def make_plan(n: int, model: str, seed: int = 0, words: list[str] | None = None) -> list[SoakRequest]:
    """`n` requests for `model`: the seeded mix described in the module docstring."""
    rng = random.Random(seed)
    words = words or corpus_text().split()
    plan = []
    for i in range(n):
        endpoint = rng.choice(list(ENDPOINTS))
        prompt = " ".join(corpus_window(words, rng, rng.randint(8, 64)))
        u = rng.random()
        if u < MALFORMED_SHARE:
            kind = rng.choice(sorted(MALFORMED))
            stream = rng.random() < 0.5
            bad = MALFORMED[kind](_good_body(endpoint, model, prompt, rng, stream))
            req = SoakRequest(i, endpoint, stream, malformed=kind)
            if isinstance(bad, bytes):
                req.raw = bad
            else:
                req.body = bad
        elif u < MALFORMED_SHARE + ABANDONED_SHARE:
            req = SoakRequest(i, endpoint, True, abandon=True, body=_good_body(endpoint, model, prompt, rng, True))
        else:
            stream = rng.random() < 0.5
            req = SoakRequest(i, endpoint, stream, body=_good_body(endpoint, model, prompt, rng, stream))
        plan.append(req)
    return plan
