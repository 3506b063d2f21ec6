"""The HTTP face: FastAPI routes in OpenAI's shapes, the API key check, request ids.

Request parsing and errors live in errors.py, a call's life (merging, streaming,
disconnects, metrics, the log line) in calls.py, the response shapes in responses.py.
Every response carries `X-Request-Id`; one log line is written per finished request.
Several models may be served, one engine each; a request's `model` picks its engine, or,
for the router's name ("auto"), router.py picks one. Responses to generation requests
carry `X-Tuili-Routed-To` (the model that answered, also in the body's `model` field).
"""
from __future__ import annotations

import functools
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
from .router import Decision, Router

log = logging.getLogger("tuili.serve")


def create_app(models: ModelRegistry, api_key: str | None = None, on_ready=None,
               router: Router | None = None) -> FastAPI:
    metrics = Metrics()
    if router is not None:
        router.on_decision = metrics.observe_route

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
    app.state.router = router

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
        routed = getattr(request.state, "routed_to", None)
        if routed is not None:
            response.headers["X-Tuili-Routed-To"] = routed
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

    def model_card(m: ServedModel) -> dict:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "tuili",
                "max_model_len": m.max_model_len}

    def router_card() -> dict:
        fast, strong = models.get(router.fast), models.get(router.strong)
        return {"id": router.name, "object": "model", "created": min(fast.created, strong.created),
                "owned_by": "tuili", "max_model_len": min(fast.max_model_len, strong.max_model_len),
                "routes_to": {"fast": fast.name, "strong": strong.name}}

    @app.get("/v1/models")
    async def list_models():
        cards = [model_card(m) for m in models.all()]
        if router is not None:
            cards.append(router_card())
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if router is not None and name == router.name:
            return router_card()
        return model_card(_served(models, name))

    def pick(request: Request, name: str, prompt: str | None = None, messages: list | None = None,
             max_tokens: int | None = None) -> ServedModel:
        """The engine for a request: its named model, or the router's choice for the router's name."""
        if router is not None and name == router.name:
            decision = router.route(name, prompt, messages, max_tokens)
        else:
            served = _served(models, name)
            decision = Decision(served.name, "explicit")
            if router is not None:
                router.route(name)  # counts the explicit decision
            else:
                metrics.observe_route(decision)
        request.state.routed_to = decision.model
        request.state.route = decision.reason if decision.score is None else f"{decision.reason}:{decision.score:.3f}"
        return models.get(decision.model)

    def completion_model(request: Request, req: CompletionRequest) -> ServedModel:
        if router is None or req.model != router.name:
            return pick(request, req.model)
        prompts = _checked(req.prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise APIError(400, f"prompt: token-id prompts need a named model; the models behind "
                                f"{router.name!r} have different tokenizers", param="prompt")
        return pick(request, req.model, prompt="\n".join(prompts), max_tokens=req.max_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse_body(request, CompletionRequest)
        served = completion_model(request, req)
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
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        served = pick(request, req.model, messages=[m.as_template_dict() for m in req.messages],
                      max_tokens=max_tokens)
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


def model_specs(args) -> list:
    """The served models: every --model NAME=MODEL[,opts], plus the positional MODEL if given;
    the default model when neither is."""
    from ..cli import DEFAULT_MODEL
    from .model_spec import ModelSpec, engine_option_names, parse_model_spec

    known = engine_option_names()
    specs = [parse_model_spec(text, known) for text in (args.models or [])]
    if args.model is not None or not specs:
        specs.insert(0, ModelSpec(args.served_model_name, args.model or DEFAULT_MODEL))
    elif args.served_model_name:
        raise ValueError("--served-model-name: names the positional MODEL; with --model, write NAME=MODEL")
    return specs


def build_registry(args, engine_options: dict[str, Any]) -> ModelRegistry:
    """One Engine (own weights, own KV budget) and one AsyncEngine thread per served model."""
    from ..engine.async_engine import AsyncEngine
    from ..engine.engine import Engine

    registry = ModelRegistry()
    specs = model_specs(args)
    names = [s.name for s in specs if s.name is not None]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"--model: the name {dup!r} is given twice")
    for spec in specs:
        options = dict(engine_options, **spec.options)
        # loaded in its loop thread: one OpenMP team per model, not one more in the main thread
        served = AsyncEngine.load(functools.partial(Engine, spec.model, **options), max_queue=args.max_queue)
        name = spec.name or served.model_name
        registry.add(name, served)
        if len(specs) > 1:
            log.info("serving %s as %r (%s)", spec.model, name,
                     ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "server-wide engine options")
    return registry


def build_router(args, registry: ModelRegistry) -> Router | None:
    """The router behind --router-name, when --router fast=NAME,strong=NAME is given."""
    if not getattr(args, "router", None):
        return None
    from ..router.commands import load_router
    from .model_spec import parse_router_spec

    fast, strong = parse_router_spec(args.router)
    classifier = load_router(args.router_model, args.router_strong_share)
    engines = {m.name: m.engine for m in registry.all()}
    router = Router(args.router_name, fast, strong, classifier, engines, max_wait_ms=args.router_max_wait)
    log.info("router %r: fast=%s strong=%s threshold=%.4f (strong share %.2f) max_wait=%s ms",
             router.name, fast, strong, classifier.threshold, classifier.strong_share, args.router_max_wait)
    return router


def serve(args, engine_options: dict[str, Any]) -> int:
    import uvicorn

    if getattr(args, "router", None):  # check the router's flags before loading any model
        from ..router.commands import load_router
        from .model_spec import parse_router_spec

        fast, strong = parse_router_spec(args.router)
        load_router(args.router_model, args.router_strong_share)
        if args.router_max_wait is not None and args.router_max_wait < 0:
            raise ValueError(f"--router-max-wait: must be >= 0 ms, got {args.router_max_wait}")
        named = [s.name for s in model_specs(args)]
        for want in (fast, strong):
            if None not in named and want not in named:
                raise ValueError(f"--router: {want!r} is not a served model; served: {', '.join(named)}")
    registry = build_registry(args, engine_options)
    router = build_router(args, registry)
    names = [m.name for m in registry.all()] + ([router.name] if router else [])
    name = names[-1] if router else names[0]
    base = f"http://{args.host}:{args.port}"
    auth = f" -H 'Authorization: Bearer {args.api_key}'" if args.api_key else ""

    def ready() -> None:
        print(f"tuili serving {', '.join(names)} at {base}/v1\n"
              f"try: curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
              flush=True)

    app = create_app(registry, api_key=args.api_key, on_ready=ready, router=router)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    uvicorn.Server(config).run()
    return 0
