"""The OpenAI-shaped routes: models, completions, chat completions, health and metrics.

A generation route parses its body (protocol.py), picks the served model (its name, or the
router's choice for the router's name), tokenizes and checks the prompts through that
model's `AsyncEngine`, then hands the call to calls.py, which streams or collects it.
Responses to generation requests carry `X-Tuili-Routed-To` (the model that answered, also
in the body's `model` field).
"""
from __future__ import annotations

from typing import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine import InvalidRequestError
from . import responses as R
from . import tools as T
from .calls import Call, chat_events, completion_events, prompt_text
from .errors import APIError, bad_request, error_response, parse_body
from .models import ModelNotFoundError, ModelRegistry, ServedModel
from .protocol import ChatCompletionRequest, CompletionRequest
from .router import Decision

api = APIRouter()


@api.get("/health")
async def health(request: Request):
    state = request.app.state
    if getattr(state, "draining", False):
        return error_response(503, "the server is shutting down", "server_error", code="shutting_down")
    dead = [m.name for m in state.models.all() if not m.engine.is_alive]
    if dead:
        return error_response(503, f"engine loop not running for {', '.join(dead)}", "server_error",
                              code="engine_unavailable")
    return {"status": "ok"}


@api.get("/metrics")
async def metrics_route(request: Request):
    state = request.app.state
    return Response(state.metrics.render(state.models), media_type="text/plain; version=0.0.4; charset=utf-8")


def model_card(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "tuili",
            "max_model_len": m.max_model_len}


def router_card(models: ModelRegistry, router) -> dict:
    fast, strong = models.get(router.fast), models.get(router.strong)
    return {"id": router.name, "object": "model", "created": min(fast.created, strong.created),
            "owned_by": "tuili", "max_model_len": min(fast.max_model_len, strong.max_model_len),
            "routes_to": {"fast": fast.name, "strong": strong.name}}


@api.get("/v1/models")
async def list_models(request: Request):
    state = request.app.state
    cards = [model_card(m) for m in state.models.all()]
    if state.router is not None:
        cards.append(router_card(state.models, state.router))
    return {"object": "list", "data": cards}


@api.get("/v1/models/{name:path}")
async def get_model(request: Request, name: str):
    state = request.app.state
    if state.router is not None and name == state.router.name:
        return router_card(state.models, state.router)
    return model_card(served_model(state.models, name))


@api.post("/v1/completions")
async def completions(request: Request):
    req: CompletionRequest = await parse_body(request, CompletionRequest)
    prompts = checked(req.prompts)

    def start(served: ServedModel, probe_layer: int | None = None) -> Call:
        params = checked(req.to_sampling_params)
        params.hidden_layer = probe_layer
        ids = checked(lambda: [served.engine.prepare(p, params) for p in prompts])
        return Call(request, served, request.app.state.metrics, "cmpl", ids, params)

    served, call = await routed_call(request, req.model, start, prompt=_router_prompt(request, req.model, prompts),
                                     max_tokens=req.max_tokens, probe=len(prompts) == 1)
    params = call.params
    request.app.state.metrics.observe_constrained(served.name, params, False)
    if req.stream:
        return call.streaming_response(lambda: completion_events(call, req.echo, req.include_usage, prompts))
    outs = await call.collect()
    tok = R.TokenText(served.tokenizer)
    choices = []
    for k, out in enumerate(outs):
        prefix = prompt_text(prompts[k], served) if req.echo else ""
        for c in out.outputs:
            lp = R.completion_logprobs(c.logprobs, tok, len(prefix)) if c.logprobs is not None else None
            choices.append({"index": k * params.n + c.index, "text": prefix + c.text, "logprobs": lp,
                            "finish_reason": R.finish_reason(c.finish_reason)})
    return {"id": call.rid, "object": "text_completion", "created": call.created, "model": served.name,
            "choices": choices, "usage": R.usage(*R.totals(outs))}


@api.post("/v1/chat/completions")
async def chat_completions(request: Request):
    req: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    messages = [m.as_template_dict() for m in req.messages]
    checked(req.check_tools)
    choice = checked(lambda: req.effective_tool_choice)

    def start(served: ServedModel, probe_layer: int | None = None) -> Call:
        forced = (T.forced_grammar(req.tools, choice, req.parallel_tool_calls) if choice not in ("none", "auto")
                  else None)
        params = checked(lambda: req.to_sampling_params(forced))
        params.hidden_layer = probe_layer
        if req.tools:  # every definition's parameters must compile, whatever tool_choice says
            checked(lambda: [served.engine.check_constraint(g) for g in T.parameter_constraints(req.tools)])
        prompt_tools = T.prompt_tools(req)
        ids = checked(lambda: [served.engine.prepare(
            served.engine.chat_ids(messages, req.add_generation_prompt, tools=prompt_tools), params)])
        return Call(request, served, request.app.state.metrics, "chatcmpl", ids, params)

    served, call = await routed_call(request, req.model, start, messages=messages, max_tokens=max_tokens)
    params = call.params
    request.app.state.metrics.observe_constrained(served.name, params, choice != "none")
    parse_calls = choice != "none"
    if req.stream:
        if parse_calls:
            return call.streaming_response(lambda: T.chat_tool_events(call, req.include_usage))
        return call.streaming_response(lambda: chat_events(call, req.include_usage))
    outs = await call.collect()
    tok = R.TokenText(served.tokenizer)
    choices = []
    for c in outs[0].outputs:
        if parse_calls:
            message, reason = T.message(c.text, c.finish_reason)
        else:
            message, reason = {"role": "assistant", "content": c.text}, R.finish_reason(c.finish_reason)
        choices.append({"index": c.index, "message": message,
                        "logprobs": R.chat_logprobs(c.logprobs, tok) if c.logprobs is not None else None,
                        "finish_reason": reason})
    return {"id": call.rid, "object": "chat.completion", "created": call.created, "model": served.name,
            "choices": choices, "usage": R.usage(*R.totals(outs))}


async def routed_call(request: Request, name: str, start: Callable[..., Call], prompt: str | None = None,
                      messages: list | None = None, max_tokens: int | None = None,
                      probe: bool = True) -> tuple[ServedModel, Call]:
    """The model for a request (its name, or the router's choice for the router's name) and the
    call started on it by `start(served, probe_layer=None)`.

    With the router's probe, the request starts on the fast model at once, asking for the
    probe's hidden state; the router reads it with the first token and either keeps that
    call (nothing computed twice) or discards it and starts the request on the strong model."""
    state = request.app.state
    if state.draining:
        raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
    router, models = state.router, state.models
    call = None
    if router is not None and name == router.name:
        read = None
        if probe and router.probe_layer is not None:
            try:
                call = start(models.get(router.fast), router.probe_layer)
                read = call.read_hidden
            except APIError as e:  # the fast model refuses it (too long for it, queue full): features decide
                read = _failing(e)
        decision = await router.route_async(name, prompt, messages, max_tokens, read)
        if call is not None and (decision.model != router.fast or decision.signal != "probe"):
            call.discard()
            call = None
    else:
        served = served_model(models, name)
        decision = Decision(served.name, "explicit")
        if router is not None:
            router.route(name)  # counts the explicit decision
        else:
            state.metrics.observe_route(decision)
    request.state.routed_to = decision.model
    request.state.route_reason = decision.reason
    request.state.route = (decision.reason if decision.score is None
                           else f"{decision.reason}:{decision.signal}:{decision.score:.3f}")
    served = models.get(decision.model)
    return served, call if call is not None else start(served)


def _failing(error: BaseException) -> Callable[[], Awaitable[list[float]]]:
    async def read() -> list[float]:
        raise error
    return read


def _router_prompt(request: Request, name: str, prompts: list) -> str | None:
    router = request.app.state.router
    if router is None or name != router.name:
        return None
    if not all(isinstance(p, str) for p in prompts):
        raise APIError(400, f"prompt: token-id prompts need a named model; the models behind "
                            f"{router.name!r} have different tokenizers", param="prompt")
    return "\n".join(prompts)


def served_model(models: ModelRegistry, name: str) -> ServedModel:
    try:
        return models.get(name)
    except ModelNotFoundError as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None


def checked(fn):
    try:
        return fn()
    except (InvalidRequestError, ValueError) as e:
        raise bad_request(e) from None
