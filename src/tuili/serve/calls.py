"""One HTTP call's engine requests: submission, merging, streaming, disconnects, metrics, the log line.

Each prompt of a call is one engine request with `n` sequences; their outputs are merged,
and choice `index` is prompt_index * n + completion_index, as OpenAI numbers them. A
client that goes away aborts its requests at once: streams through the cancelled
generator, non-streamed calls through a disconnect watcher.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.async_engine import EngineDeadError, QueueFullError
from ..engine.engine import RequestOutput
from ..sampling import SamplingParams
from . import responses as R
from .errors import APIError, bad_request
from .metrics import Metrics
from .models import ServedModel
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("tuili.serve")


def prompt_text(prompt: str | list[int], served: ServedModel) -> str:
    if isinstance(prompt, str):
        return prompt
    return served.tokenizer.decode(prompt) if served.tokenizer is not None else ""


class Call:
    """One HTTP request's engine requests: submission, merging, disconnects, metrics, the log line."""

    def __init__(self, request: Request, served: ServedModel, metrics: Metrics, rid: str,
                 prompt_ids: list[list[int]], params: SamplingParams):
        self.request, self.served, self.metrics, self.rid = request, served, metrics, rid
        self.prompt_ids, self.params = prompt_ids, params
        self.created = R.now()
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.latest: dict[int, RequestOutput] = {}
        try:
            self.iterators = [served.engine.add(self.sub_id(k), ids, params) for k, ids in enumerate(prompt_ids)]
        except QueueFullError as e:
            for k in range(len(prompt_ids)):
                served.engine.abort(self.sub_id(k))
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except EngineDeadError as e:
            raise APIError(503, str(e), "server_error", code="engine_unavailable") from None

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as they come, from all prompts of the call."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, it) -> None:
            try:
                async for out in it:
                    await queue.put((k, out))
            except Exception as e:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((k, e))
            finally:
                await queue.put((k, None))

        tasks = [asyncio.create_task(pump(k, it)) for k, it in enumerate(self.iterators)]
        live = len(tasks)
        try:
            while live:
                k, item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    if self.first_token is None and any(c.token_ids for c in item.outputs):
                        self.first_token = time.perf_counter()
                    self.latest[k] = item
                    yield k, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # A pump cancelled before it started never ran its iterator's cleanup: abort
            # every engine request of this call that has not finished (a no-op for the rest).
            for k in range(len(self.iterators)):
                if k not in self.latest or not self.latest[k].finished:
                    self.served.engine.abort(self.sub_id(k))

    def sub_id(self, k: int) -> str:
        return f"{self.rid}-{k}"

    async def collect(self) -> list[RequestOutput]:
        """Run to completion; abort if the client disconnects first."""
        async def drain() -> None:
            async for _ in self.outputs():
                pass

        task = asyncio.create_task(drain())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await self.request.is_disconnected():
                task.cancel()
                self.finish(aborted=True)
                raise APIError(499, "client disconnected", code="client_closed_request")
        try:
            task.result()
        except ValueError as e:
            raise bad_request(e) from None
        except RuntimeError as e:
            raise APIError(500, str(e), "server_error", code="engine_error") from None
        self.finish()
        return [self.latest[k] for k in range(len(self.prompt_ids))]

    def stream(self, events) -> StreamingResponse:
        async def body():
            try:
                async for event in events():
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except (ValueError, RuntimeError) as e:
                err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
            except asyncio.CancelledError:
                self.finish(aborted=True)
                raise
            yield "data: [DONE]\n\n"
            self.finish()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    def finish(self, aborted: bool = False) -> None:
        outs = [self.latest[k] for k in sorted(self.latest)]
        prompt = sum(len(p) for p in self.prompt_ids)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        total = time.perf_counter() - self.start
        ttft = None if self.first_token is None else self.first_token - self.start
        reasons = ["abort"] if aborted else [c.finish_reason or "unknown" for o in outs for c in o.outputs]
        self.metrics.observe_request(self.served.name, prompt, completion, ttft, total, reasons)
        log.info("request_id=%s model=%s route=%s prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs "
                 "finish=%s", self.rid, self.served.name, getattr(self.request.state, "route", "explicit"), prompt,
                 completion, "-" if ttft is None else f"{ttft:.3f}s", total, ",".join(sorted(set(reasons))))


async def completion_events(call: Call, req: CompletionRequest, prompts: list) -> AsyncIterator[dict]:
    state = R.StreamState()
    tok = R.TokenText(call.served.tokenizer)
    model = call.served.name
    n = call.params.n
    if req.echo:
        for k, p in enumerate(prompts):
            for j in range(n):
                yield R.completion_chunk(call.rid, call.created, model, k * n + j, prompt_text(p, call.served),
                                         None, None)
    async for k, out in call.outputs():
        for c in out.outputs:
            index = k * n + c.index
            st = state.choice(index)
            offset = st.text_len
            delta, entries, finished = R.new_pieces(c, st)
            if delta or entries or finished:
                lp = R.completion_logprobs(entries, tok, offset) if c.logprobs is not None else None
                yield R.completion_chunk(call.rid, call.created, model, index, delta, lp,
                                         R.finish_reason(c) if finished else None)
    if req.include_usage:
        yield R.usage_chunk(call.rid, call.created, model, "text_completion",
                            R.usage(*R.totals([call.latest[k] for k in sorted(call.latest)])))


async def chat_events(call: Call, req: ChatCompletionRequest) -> AsyncIterator[dict]:
    state = R.StreamState()
    tok = R.TokenText(call.served.tokenizer)
    model = call.served.name
    for j in range(call.params.n):
        yield R.chat_chunk(call.rid, call.created, model, j, {"role": "assistant", "content": ""}, None, None)
    async for _, out in call.outputs():
        for c in out.outputs:
            st = state.choice(c.index)
            delta, entries, finished = R.new_pieces(c, st)
            lp = R.chat_logprobs(entries, tok) if c.logprobs is not None and entries else None
            if delta or entries:
                yield R.chat_chunk(call.rid, call.created, model, c.index, {"content": delta}, lp, None)
            if finished:
                yield R.chat_chunk(call.rid, call.created, model, c.index, {}, None, R.finish_reason(c))
    if req.include_usage:
        yield R.usage_chunk(call.rid, call.created, model, "chat.completion.chunk",
                            R.usage(*R.totals([call.latest[k] for k in sorted(call.latest)])))
