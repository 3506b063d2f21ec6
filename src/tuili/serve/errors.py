"""Errors in OpenAI's form, and request bodies parsed so that every malformed one is a 400.

Bodies are parsed here (JSON, then pydantic) rather than by FastAPI's signature
injection, so a client never sees FastAPI's 422, and `param` names the field at fault.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, param, code).body(), status_code=status)


def param_of(message: str) -> str | None:
    """Our ValueErrors start with the field name: 'top_p: must be in (0, 1]'."""
    head = message.split(":", 1)[0]
    return head if head.replace("_", "").replace(".", "").isalnum() and head != message else None


def bad_request(e: ValueError) -> APIError:
    return APIError(400, str(e), param=param_of(str(e)))


def validation_error(e: ValidationError | RequestValidationError) -> APIError:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = first.get("msg", "invalid value")
    return APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None)


async def parse_body(request: Request, model_cls: type[BaseModel]) -> Any:
    """The body as `model_cls`; models are strict, so `"max_tokens": "12"` or
    `"temperature": false` is a 400 naming the field, not a silent coercion."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
