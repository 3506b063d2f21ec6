"""What the engine hands out: per-step deltas, the final state they add up to, and errors.

`Engine.step()` returns one `RequestDelta` per request that moved: the token ids, text
and logprobs that are new since the last delta, never the whole output again, so a long
answer costs O(n) to hand out, not O(n^2). Text that could still be the start of a stop
string is held back until it is known not to be one; a finished sequence's last delta
flushes it. `RequestOutput.add` sums deltas into the vLLM-shaped final output that the
offline `LLM` API and non-streamed HTTP responses return.

Errors a request can end with travel as exceptions of the types below, so callers map
them to their own form (HTTP status, CLI message) without parsing messages.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely tokens with their logprobs


@dataclass
class CompletionDelta:
    """What one completion (sequence) gained in one step."""

    index: int  # which of the request's n completions
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # None unless the request asked for logprobs
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestDelta:
    request_id: str
    outputs: list[CompletionDelta]
    finished: bool  # every completion of the request has finished
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    hidden: list[float] | None = None  # with SamplingParams.hidden_layer: on the first delta with a token


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """A request's whole output: the sum of its deltas."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    hidden: list[float] | None = None  # with SamplingParams.hidden_layer
    _parts: list[list[str]] = field(default_factory=list, repr=False)

    @classmethod
    def empty(cls, request_id: str, prompt: str | None, prompt_token_ids: list[int], n: int,
              logprobs: bool) -> RequestOutput:
        outs = [CompletionOutput(i, "", [], None, None, [] if logprobs else None) for i in range(n)]
        return cls(request_id, prompt, list(prompt_token_ids), outs, _parts=[[] for _ in range(n)])

    def add(self, delta: RequestDelta) -> None:
        """Append a delta; text pieces are joined once, when the output finishes."""
        for d in delta.outputs:
            out = self.outputs[d.index]
            out.token_ids.extend(d.token_ids)
            if d.text:
                self._parts[d.index].append(d.text)
            if d.logprobs is not None and out.logprobs is not None:
                out.logprobs.extend(d.logprobs)
            if d.finish_reason is not None:
                out.finish_reason, out.stop_reason = d.finish_reason, d.stop_reason
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.hidden is not None:
            self.hidden = delta.hidden
        self.finished = delta.finished
        if self.finished:
            self.join_text()

    def join_text(self) -> None:
        for out, parts in zip(self.outputs, self._parts):
            if parts:
                out.text += "".join(parts)
                parts.clear()


class InvalidRequestError(ValueError):
    """The request cannot run as given (bad prompt, too long for the context); the message
    starts with the field at fault, as in 'prompt: ...'."""


class EngineError(RuntimeError):
    """The engine failed while running a request; the request ends, the engine serves on."""


class EngineDeadError(EngineError):
    """The engine loop is not running: nothing can be served by it."""


class EngineShutdownError(EngineError):
    """The server is shutting down and ended the request before it finished."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later."""
