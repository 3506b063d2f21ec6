"""The HTTP app: FastAPI with the edge middleware, the routes, errors in OpenAI's form.

Request parsing and errors live in errors.py, the edge (ids, API key, size limit) in
middleware.py, the routes in routes.py, a call's life in calls.py, the response shapes in
responses.py, the OpenAPI document's error responses and request bodies in openapi.py,
and starting and stopping the server in launch.py. Several models may be served, one
engine each; a request's `model` picks its engine, or, for the router's name ("auto"),
router.py picks one.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

from .errors import APIError, error_response, validation_error
from .metrics import Metrics
from .middleware import EdgeMiddleware
from .models import ModelRegistry
from .openapi import document
from .router import Router
from .routes import api
from .web import web


def create_app(models: ModelRegistry, api_key: str | None = None, on_ready=None, router: Router | None = None,
               max_request_bytes: int = 4 << 20) -> FastAPI:
    metrics = Metrics()
    if router is not None:
        router.on_decision = metrics.observe_route
        router.on_probe = metrics.observe_probe

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
    app.state.draining = False
    app.include_router(api)
    app.include_router(web)  # the chat page, the dashboard and /v1/stats
    app.add_middleware(EdgeMiddleware, metrics=metrics, api_key=api_key, max_request_bytes=max_request_bytes)
    app.openapi = lambda: document(app)
    _error_handlers(app)
    return app


def _error_handlers(app: FastAPI) -> None:
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
