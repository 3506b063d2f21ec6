"""One HTTP call's life: submission, deltas, streaming, disconnects, metrics, the log line.

Each prompt of a call is one engine request with `n` completions; choice `index` is
prompt_index * n + completion_index, as OpenAI numbers them. The engine's deltas arrive
on the call's one queue (`RequestStream`) and are summed per prompt for the usage and the
non-streamed body. A client that goes away aborts the call at once: a stream when its
body generator is closed, a non-streamed call when its disconnect watcher, waiting on the
ASGI `receive()`, sees `http.disconnect` (no polling).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import (EngineDeadError, EngineError, EngineShutdownError, InvalidRequestError, QueueFullError,
                      RequestDelta, RequestOutput)
from ..sampling import SamplingParams
from . import responses as R
from .errors import APIError, bad_request
from .metrics import Metrics
from .models import ServedModel

log = logging.getLogger("tuili.serve")


def prompt_text(prompt: str | list[int], served: ServedModel) -> str:
    if isinstance(prompt, str):
        return prompt
    return served.tokenizer.decode(prompt) if served.tokenizer is not None else ""


def api_error(e: BaseException) -> APIError:
    """An engine-side failure in the HTTP layer's terms."""
    if isinstance(e, (InvalidRequestError, ValueError)):
        return bad_request(e)
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", code="queue_full")
    if isinstance(e, EngineShutdownError):
        return APIError(503, str(e), "server_error", code="shutting_down")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), "server_error", code="engine_unavailable")
    if isinstance(e, EngineError):
        return APIError(500, str(e), "server_error", code="engine_error")
    raise e


class Call:
    def __init__(self, request: Request, served: ServedModel, metrics: Metrics, kind: str,
                 prompt_ids: list[list[int]], params: SamplingParams):
        self.request, self.served, self.metrics = request, served, metrics
        self.rid = f"{kind}-{request.state.request_id}"
        self.prompt_ids, self.params = prompt_ids, params
        self.created = R.now()
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.outputs = [RequestOutput.empty(self.rid, None, ids, params.n, params.logprobs is not None)
                        for ids in prompt_ids]
        self.done = False
        try:
            self.stream = served.engine.generate(prompt_ids, params)
        except (QueueFullError, EngineError) as e:
            raise api_error(e) from None
        self._items = aiter(self.stream)  # one iterator: read_hidden() and deltas() share it
        self._read: list[tuple[int, RequestDelta]] = []  # taken by read_hidden(), not yet handed out

    async def read_hidden(self) -> list[float]:
        """Wait for the hidden state the call asked for (params.hidden_layer; it comes with the
        first token), keeping what arrived for `deltas()`: the router's probe."""
        async for k, delta in self._items:
            self._seen(k, delta)
            self._read.append((k, delta))
            if delta.hidden is not None:
                return delta.hidden
        raise EngineError("the call ended without the hidden state it asked for")

    def discard(self) -> None:
        """Drop a call that will not answer (the router chose another model): aborted, not counted."""
        self.done = True
        self.stream.abort()

    def _seen(self, k: int, delta: RequestDelta) -> None:
        if self.first_token is None and any(c.token_ids for c in delta.outputs):
            self.first_token = time.perf_counter()
        self.outputs[k].add(delta)

    async def deltas(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        """(prompt index, delta) as they come; the call's outputs grow as they pass."""
        while self._read:
            yield self._read.pop(0)
        async for k, delta in self._items:
            self._seen(k, delta)
            yield k, delta

    async def collect(self) -> list[RequestOutput]:
        """Run to completion; abort at once if the client disconnects first."""
        async def drain() -> None:
            async for _ in self.deltas():
                pass

        task = asyncio.create_task(drain())
        watcher = asyncio.create_task(_disconnected(self.request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            self.stream.abort()
            self.finish(aborted=True)
            raise APIError(499, "client disconnected", code="client_closed_request")
        try:
            task.result()
        except (EngineError, ValueError) as e:
            self.finish(aborted=True)
            raise api_error(e) from None
        self.finish()
        return self.outputs

    def streaming_response(self, events) -> StreamingResponse:
        async def body():
            complete = False
            try:
                async for event in events():
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                complete = True
            except (EngineError, ValueError) as e:
                err = api_error(e)
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                if not complete:  # an error, or the client left (the generator is closed)
                    self.stream.abort()
                    self.finish(aborted=True)
            yield "data: [DONE]\n\n"
            self.finish()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    def finish(self, aborted: bool = False) -> None:
        """Metrics and the log line, once per call."""
        if self.done:
            return
        self.done = True
        prompt = sum(len(p) for p in self.prompt_ids)
        completion = sum(len(c.token_ids) for o in self.outputs for c in o.outputs)
        total = time.perf_counter() - self.start
        ttft = None if self.first_token is None else self.first_token - self.start
        reasons = ["abort"] if aborted else [c.finish_reason or "unknown" for o in self.outputs for c in o.outputs]
        self.metrics.observe_request(self.served.name, prompt, completion, ttft, total, reasons)
        state = self.request.state
        log.info("request_id=%s client_request_id=%s model=%s route=%s prompt_tokens=%d completion_tokens=%d "
                 "ttft=%s total=%.3fs finish=%s", self.rid, getattr(state, "client_request_id", None) or "-",
                 self.served.name, getattr(state, "route", "explicit"), prompt, completion,
                 "-" if ttft is None else f"{ttft:.3f}s", total, ",".join(sorted(set(reasons))))


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: receive() now waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def completion_events(call: Call, echo: bool, include_usage: bool, prompts: list) -> AsyncIterator[dict]:
    tok = R.TokenText(call.served.tokenizer)
    model = call.served.name
    n = call.params.n
    offsets: dict[int, int] = {}
    if echo:
        for k, p in enumerate(prompts):
            for j in range(n):
                text = prompt_text(p, call.served)
                offsets[k * n + j] = len(text)
                yield R.completion_chunk(call.rid, call.created, model, k * n + j, text, None, None)
    async for k, delta in call.deltas():
        for c in delta.outputs:
            index = k * n + c.index
            offset = offsets.get(index, 0)
            offsets[index] = offset + len(c.text)
            lp = R.completion_logprobs(c.logprobs, tok, offset) if c.logprobs is not None else None
            reason = R.finish_reason(c.finish_reason) if c.finish_reason is not None else None
            if c.text or lp or reason:
                yield R.completion_chunk(call.rid, call.created, model, index, c.text, lp, reason)
    if include_usage:
        yield R.usage_chunk(call.rid, call.created, model, "text_completion", R.usage(*R.totals(call.outputs)))


async def chat_events(call: Call, include_usage: bool) -> AsyncIterator[dict]:
    tok = R.TokenText(call.served.tokenizer)
    model = call.served.name
    for j in range(call.params.n):
        yield R.chat_chunk(call.rid, call.created, model, j, {"role": "assistant", "content": ""}, None, None)
    async for _, delta in call.deltas():
        for c in delta.outputs:
            lp = R.chat_logprobs(c.logprobs, tok) if c.logprobs else None
            if c.text or lp:
                yield R.chat_chunk(call.rid, call.created, model, c.index, {"content": c.text}, lp, None)
            if c.finish_reason is not None:
                yield R.chat_chunk(call.rid, call.created, model, c.index, {}, None, R.finish_reason(c.finish_reason))
    if include_usage:
        yield R.usage_chunk(call.rid, call.created, model, "chat.completion.chunk", R.usage(*R.totals(call.outputs)))
