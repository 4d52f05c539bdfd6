"""Errors as JSON a person can act on: `{"error": {"code", "message", "type", "line"?}}`.

The same shape serves the native API and the OpenAI-compatible routes (OpenAI clients read
`message`, `type` and `code`). Nothing else leaves the gateway: no stack traces.
"""

from __future__ import annotations

import json
import logging

import redis

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sculptor.stored_records import CorruptRecord

log = logging.getLogger("sculptor.gateway")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, line: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.line, self.headers = status, code, message, line, headers


class ErrorResponse(JSONResponse):
    """JSON in ASCII: a message that quotes the request (a key, a model name) may hold a lone surrogate,
    which UTF-8 cannot encode; escaped, it is still a valid answer instead of a server error."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(status: int, code: str, message: str, line: int | None = None) -> dict:
    body = {"code": code, "message": message, "type": _TYPES.get(status, "server_error")}
    if line is not None:
        body["line"] = line
    return {"error": body}


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def _unreadable_body(cause: BaseException) -> str:
    """FastAPI answers 400 "There was an error parsing the body" for a JSON body json.loads gave up on; say why."""
    if isinstance(cause, RecursionError):
        return "the JSON body nests arrays or objects too deeply to read: flatten it"
    return f"the body cannot be read as JSON ({cause}): send UTF-8 JSON"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return ErrorResponse(error_body(exc.status, exc.code, exc.message, exc.line), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return ErrorResponse(error_body(422, "invalid_request", _validation_message(exc)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = _unreadable_body(exc.__cause__) if exc.status_code == 400 and exc.__cause__ else str(exc.detail)
        return ErrorResponse(error_body(exc.status_code, code, message), exc.status_code)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_away(request: Request, exc: Exception):
        log.warning("Redis unavailable on %s %s: %s", request.method, request.url.path, exc)
        return ErrorResponse(error_body(503, "redis_unavailable", "the job store (Redis) is unreachable; generation "
                                       "still works, retry this request shortly"), 503, headers={"Retry-After": "5"})

    @app.exception_handler(redis.exceptions.OutOfMemoryError)
    async def _redis_full(request: Request, exc: Exception):
        log.error("Redis refused a write on %s %s (maxmemory reached, noeviction): %s",
                  request.method, request.url.path, exc)
        return ErrorResponse(error_body(503, "redis_full", "the job store (Redis) is full and refuses writes; "
                                        "generation still works. An operator raises its maxmemory or shortens "
                                        "SCULPTOR_JOB_RETENTION_DAYS"), 503, headers={"Retry-After": "60"})

    @app.exception_handler(CorruptRecord)
    async def _corrupt(request: Request, exc: CorruptRecord):
        log.error("a stored record failed validation on %s %s: %s", request.method, request.url.path, exc)
        return ErrorResponse(error_body(500, exc.code, f"{exc}; an operator repairs or deletes it"), 500)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ErrorResponse(error_body(500, "internal_error", "internal error; see the gateway log"), 500)
