"""The OpenAPI document: request bodies and every error response the routes can give.

The generation routes parse their bodies themselves (errors.py), so FastAPI cannot see
their schemas; they are added here from the pydantic models, and every operation lists
the errors the edge and the routes answer with, in OpenAI's error shape. A client
generator (or a fuzzer) then knows each status it may meet.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .protocol import ChatCompletionRequest, CompletionRequest

_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
_ERRORS = {
    "400": "Invalid request: malformed JSON, a wrong type or value (param names the field)",
    "401": "Missing or wrong API key",
    "404": "Unknown model or route",
    "405": "Method not allowed",
    "413": "Request body over --max-request-bytes",
    "429": "The model's queue is full; retry later",
    "500": "Internal error (a bug, or the engine failed while running the request)",
    "503": "Shutting down, or the engine loop is not running",
}
_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


# With "stream": true the body is a server-sent event stream. Open API 3.1 has `schema` of an
# event-stream media type describe one event (its fields), not the raw text: each `data` is one
# JSON chunk, or "[DONE]" at the end.
_SSE_EVENT = {"type": "object", "properties": {
    "event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"},
    "retry": {"type": "integer", "minimum": 0}}, "required": ["data"]}


def document(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version="1", routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = _ERROR_SCHEMA
    names = [m.name for m in app.state.models.all()] + ([app.state.router.name] if app.state.router else [])
    for path, ops in doc.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            for code, text in _ERRORS.items():
                responses.setdefault(code, {"description": text, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
            responses.pop("422", None)
            model = _BODIES.get(path)
            if model is not None:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schema["properties"]["model"] = {"type": "string", "enum": names, "title": "Model"}
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
                ok = responses.setdefault("200", {"description": "Successful Response"})
                ok.setdefault("content", {})["text/event-stream"] = {"schema": _SSE_EVENT}
    metrics = doc.get("paths", {}).get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"] = {"description": "Prometheus text exposition",
                                       "content": {"text/plain": {"schema": {"type": "string"}}}}
    app.openapi_schema = doc
    return doc
