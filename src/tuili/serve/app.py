"""The HTTP face: FastAPI routes in OpenAI's shapes, SSE streaming, errors in OpenAI's form.

Decisions:
- Request bodies are parsed here (JSON, then pydantic) rather than by FastAPI's
  signature injection, so every malformed body becomes a 400 in OpenAI's error form
  (never FastAPI's 422), with `param` naming the field at fault.
- Each prompt of a request is one engine request with `n` sequences; their outputs are
  merged, and choice `index` is prompt_index * n + completion_index, as OpenAI numbers them.
- A client that goes away aborts its requests at once: streams through the cancelled
  generator, non-streamed requests through a disconnect watcher.
- Every response carries `X-Request-Id`; one log line is written per finished request.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from ..engine.async_engine import EngineDeadError, QueueFullError
from ..engine.engine import RequestOutput
from ..sampling import SamplingParams
from . import responses as R
from .metrics import Metrics
from .models import ModelNotFoundError, ModelRegistry, ServedModel
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("tuili.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def _param_of(message: str) -> str | None:
    """Our ValueErrors start with the field name: 'top_p: must be in (0, 1]'."""
    head = message.split(":", 1)[0]
    return head if head.replace("_", "").replace(".", "").isalnum() and head != message else None


def bad_request(e: ValueError) -> APIError:
    return APIError(400, str(e), param=_param_of(str(e)))


def _validation_error(e: ValidationError | RequestValidationError) -> APIError:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = first.get("msg", "invalid value")
    return APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None)


async def parse_body(request: Request, model_cls: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None


def create_app(models: ModelRegistry, api_key: str | None = None, on_ready=None) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        models.start()
        if on_ready is not None:
            on_ready()
        yield
        models.shutdown()

    app = FastAPI(title="tuili", lifespan=lifespan)
    app.state.models = models
    app.state.metrics = metrics

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
        path = request.url.path
        if api_key and path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                response = error_response(401, "Incorrect or missing API key. Send 'Authorization: Bearer KEY'.",
                                          "authentication_error", code="invalid_api_key")
                response.headers["X-Request-Id"] = rid
                metrics.requests.labels(path, "401").inc()
                return response
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - a bug: log it, answer 500 in OpenAI's form
            log.exception("request %s failed", rid)
            response = error_response(500, "internal error", "internal_error")
        response.headers["X-Request-Id"] = rid
        if path != "/metrics":
            metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = _validation_error(e)
        return error_response(400, err.message, param=err.param)

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return error_response(404, f"no route for {request.method} {request.url.path}", code="not_found")

    @app.exception_handler(405)
    async def _not_allowed(request: Request, e):
        return error_response(405, f"method {request.method} not allowed on {request.url.path}",
                              code="method_not_allowed")

    @app.get("/health")
    async def health():
        dead = [m.name for m in models.all() if not m.engine.is_alive]
        if dead:
            return error_response(503, f"engine loop not running for {', '.join(dead)}", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(models), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "tuili",
             "max_model_len": m.max_model_len} for m in models.all()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        m = _served(models, name)
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "tuili",
                "max_model_len": m.max_model_len}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse_body(request, CompletionRequest)
        served = _served(models, req.model)
        params, prompts = _checked(lambda: (req.to_sampling_params(), req.prompts()))
        ids = _checked(lambda: [served.engine.prepare(p, params) for p in prompts])
        call = _Call(request, served, metrics, f"cmpl-{request.state.request_id}", ids, params)
        if req.stream:
            return call.stream(lambda: _completion_events(call, req, prompts))
        outs = await call.collect()
        tok = R.TokenText(served.tokenizer)
        choices = []
        for k, out in enumerate(outs):
            prefix = _prompt_text(prompts[k], served) if req.echo else ""
            for c in out.outputs:
                lp = R.completion_logprobs(c.logprobs, tok, len(prefix)) if c.logprobs is not None else None
                choices.append({"index": k * params.n + c.index, "text": prefix + c.text, "logprobs": lp,
                                "finish_reason": R.finish_reason(c)})
        return {"id": call.rid, "object": "text_completion", "created": call.created, "model": served.name,
                "choices": choices, "usage": R.usage(*R.totals(outs))}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
        served = _served(models, req.model)
        params = _checked(req.to_sampling_params)
        ids = _checked(lambda: [served.engine.prepare(_chat_ids(served, req), params)])
        call = _Call(request, served, metrics, f"chatcmpl-{request.state.request_id}", ids, params)
        if req.stream:
            return call.stream(lambda: _chat_events(call, req))
        outs = await call.collect()
        tok = R.TokenText(served.tokenizer)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": R.chat_logprobs(c.logprobs, tok) if c.logprobs is not None else None,
                    "finish_reason": R.finish_reason(c)} for c in outs[0].outputs]
        return {"id": call.rid, "object": "chat.completion", "created": call.created, "model": served.name,
                "choices": choices, "usage": R.usage(*R.totals(outs))}

    return app


def _served(models: ModelRegistry, name: str) -> ServedModel:
    try:
        return models.get(name)
    except ModelNotFoundError as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None


def _checked(fn):
    try:
        return fn()
    except ValueError as e:
        raise bad_request(e) from None


def _chat_ids(served: ServedModel, req: ChatCompletionRequest) -> list[int]:
    tok = served.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError(f"messages: model {served.name!r} has no chat template; use /v1/completions")
    try:
        text = tok.apply_chat_template([m.as_template_dict() for m in req.messages], tokenize=False,
                                       add_generation_prompt=req.add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the caller's input
        raise ValueError(f"messages: the chat template rejected them: {e}") from None
    return tok(text, add_special_tokens=False).input_ids


def _prompt_text(prompt: str | list[int], served: ServedModel) -> str:
    if isinstance(prompt, str):
        return prompt
    return served.tokenizer.decode(prompt) if served.tokenizer is not None else ""


class _Call:
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
        log.info("request_id=%s model=%s prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs finish=%s",
                 self.rid, self.served.name, prompt, completion, "-" if ttft is None else f"{ttft:.3f}s",
                 total, ",".join(sorted(set(reasons))))


async def _completion_events(call: _Call, req: CompletionRequest, prompts: list) -> AsyncIterator[dict]:
    state = R.StreamState()
    tok = R.TokenText(call.served.tokenizer)
    model = call.served.name
    n = call.params.n
    if req.echo:
        for k, p in enumerate(prompts):
            for j in range(n):
                yield R.completion_chunk(call.rid, call.created, model, k * n + j, _prompt_text(p, call.served),
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


async def _chat_events(call: _Call, req: ChatCompletionRequest) -> AsyncIterator[dict]:
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


def build_registry(args, engine_options: dict[str, Any]) -> ModelRegistry:
    from ..engine.async_engine import AsyncEngine
    from ..engine.engine import Engine

    registry = ModelRegistry()
    engine = Engine(args.model, **engine_options)
    name = args.served_model_name or engine.model_name
    registry.add(name, AsyncEngine(engine, max_queue=args.max_queue))
    return registry


def serve(args, engine_options: dict[str, Any]) -> int:
    import uvicorn

    registry = build_registry(args, engine_options)
    name = registry.all()[0].name
    base = f"http://{args.host}:{args.port}"
    auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""

    def ready() -> None:
        print(f"tuili serving {name} at {base}/v1\n"
              f"try: curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
              flush=True)

    app = create_app(registry, api_key=args.api_key, on_ready=ready)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    uvicorn.Server(config).run()
    return 0
