"""The HTTP face: FastAPI routes in OpenAI's shapes, the API key check, request ids.

Request parsing and errors live in errors.py, a call's life (merging, streaming,
disconnects, metrics, the log line) in calls.py, the response shapes in responses.py.
Every response carries `X-Request-Id`; one log line is written per finished request.
"""
from __future__ import annotations

import hmac
import logging
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from . import responses as R
from .calls import Call, chat_events, completion_events, prompt_text
from .errors import APIError, bad_request, error_response, parse_body, validation_error
from .metrics import Metrics
from .models import ModelNotFoundError, ModelRegistry, ServedModel
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("tuili.serve")


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
        err = validation_error(e)
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
        call = Call(request, served, metrics, f"cmpl-{request.state.request_id}", ids, params)
        if req.stream:
            return call.stream(lambda: completion_events(call, req, prompts))
        outs = await call.collect()
        tok = R.TokenText(served.tokenizer)
        choices = []
        for k, out in enumerate(outs):
            prefix = prompt_text(prompts[k], served) if req.echo else ""
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
        call = Call(request, served, metrics, f"chatcmpl-{request.state.request_id}", ids, params)
        if req.stream:
            return call.stream(lambda: chat_events(call, req))
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
