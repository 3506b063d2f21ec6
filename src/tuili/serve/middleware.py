"""The server's edge, as plain ASGI: request ids, the API key, the body size limit, the
per-endpoint request counter, and headers every response carries.

Decisions:
- Every request gets a server-made id (`scope["state"]["request_id"]`). A client's
  `X-Request-Id` is only echoed back and logged beside it (`client_request_id`); it never
  names anything inside the server, so no client can reach another's request with it.
- Bodies over `max_request_bytes` get 413 before they are parsed: at once when
  Content-Length says so, otherwise as soon as the streamed body passes the limit.
- A bug that escapes a route answers 500 in OpenAI's error form and is logged with the id;
  the server serves on.
- Plain ASGI rather than Starlette's BaseHTTPMiddleware: streamed responses pass through
  untouched, and a route can wait on `receive()` for the client's disconnect.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import uuid
from typing import Any

from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("tuili.serve")

_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces, bounded


class BodyTooLarge(Exception):
    pass


def error_body(status: int, message: str, type_: str, code: str | None) -> tuple[int, bytes]:
    return status, json.dumps(APIError(status, message, type_, code=code).body()).encode()


class EdgeMiddleware:
    def __init__(self, app, *, metrics: Metrics, api_key: str | None = None, max_request_bytes: int = 4 << 20):
        self.app = app
        self.metrics = metrics
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        state = scope.setdefault("state", {})
        state["request_id"] = rid = uuid.uuid4().hex
        client_rid = headers.get("x-request-id")
        state["client_request_id"] = client_rid if client_rid and _CLIENT_ID.match(client_rid) else None
        path = scope.get("path", "")
        started: dict[str, int] = {}

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
                extra = [(b"x-request-id", (state["client_request_id"] or rid).encode("latin-1"))]
                routed = state.get("routed_to")
                if routed:
                    extra.append((b"x-tuili-routed-to", routed.encode("utf-8")))
                    extra.append((b"x-tuili-route-reason", str(state.get("route_reason", "")).encode("utf-8")))
                message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        async def reply(status: int, body: bytes) -> None:
            await send_with_headers({"type": "http.response.start", "status": status,
                                     "headers": [(b"content-type", b"application/json"),
                                                 (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        try:
            refusal = self._refusal(path, headers)
            if refusal is not None:
                await reply(*refusal)
                return
            await self.app(scope, self._limited(receive), send_with_headers)
        except BodyTooLarge:
            if "status" not in started:
                await reply(*self._too_large())
        except Exception:  # noqa: BLE001 - a bug: log it, answer 500 in OpenAI's form
            log.exception("request_id=%s failed", rid)
            if "status" not in started:
                await reply(*error_body(500, "internal error", "server_error", "internal_error"))
        finally:
            if path != "/metrics":
                self.metrics.requests.labels(_bucket(path), str(started.get("status", 499))).inc()

    def _refusal(self, path: str, headers: dict[str, str]) -> tuple[int, bytes] | None:
        if self.api_key and path.startswith("/v1"):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return error_body(401, "Incorrect or missing API key. Send 'Authorization: Bearer KEY'.",
                                  "authentication_error", "invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> tuple[int, bytes]:
        return error_body(413, f"the request body is larger than this server's limit of {self.max_request_bytes} "
                               f"bytes (--max-request-bytes)", "invalid_request_error", "request_too_large")

    def _limited(self, receive):
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_request_bytes:
                    raise BodyTooLarge()
            return message

        return limited


_KNOWN_PATHS = {"/", "/health", "/dashboard", "/openapi.json", "/docs", "/v1/models", "/v1/completions",
                "/v1/chat/completions", "/v1/stats"}


def _bucket(path: str) -> str:
    """Known paths keep their name in the counter; anything else falls in a bucket, so a
    client probing random paths cannot grow the metrics without bound."""
    if path in _KNOWN_PATHS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
