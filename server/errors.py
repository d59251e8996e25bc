"""Error rendering: one exception hierarchy (core.errors), one body shape per API surface.

The surface is chosen from the routed path. Bodies carry a stable ``code`` and never
exception text from libraries, paths, addresses or tracebacks.
"""
from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ChatVLMError

log = logging.getLogger("chatvlm.errors")


class Surface(str, Enum):
    VISION = "vision"      # seeds 000 and 003: {"detail": "..."}
    EASYVIZ = "easyviz"    # seed 001: {"error": "..."}
    SPEC = "spec"          # seeds 002 and 004: {"error": {"code", "message", "details"}}
    OPENAI = "openai"      # {"error": {"message", "type", "param", "code"}}
    MANAGEMENT = "management"  # seed 004: {"error": {"code", "message", "details"}, "timestamp", "path"}


_PREFIXES: list[tuple[str, Surface]] = [
    ("/api/v1/llm/", Surface.EASYVIZ),
    ("/ws/chat/", Surface.EASYVIZ),
    ("/api/v1/", Surface.SPEC),
    ("/api/", Surface.MANAGEMENT),
    ("/ws/monitor", Surface.MANAGEMENT),
    ("/v1/", Surface.OPENAI),
]

_HTTP_CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND",
               405: "METHOD_NOT_ALLOWED", 406: "NOT_ACCEPTABLE", 413: "PAYLOAD_TOO_LARGE",
               415: "UNSUPPORTED_MEDIA_TYPE", 422: "VALIDATION_ERROR", 429: "RATE_LIMITED"}

# Starlette's multipart parser refuses a form past its caps with a 400 and these messages.
_MULTIPART_CAPS = (("Too many files", "TOO_MANY_FILES"), ("Too many fields", "TOO_MANY_FIELDS"),
                   ("Part exceeded maximum size", "FIELD_TOO_LARGE"))

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
                 422: "invalid_request_error", 429: "rate_limit_error"}


def surface_for_path(path: str) -> Surface:
    for prefix, surface in _PREFIXES:
        if path.startswith(prefix):
            return surface
    return Surface.VISION


# Seed 004 names its own codes for the generic ones.
_MANAGEMENT_CODES = {"UNAUTHORIZED": "AUTHENTICATION_FAILED", "FORBIDDEN": "AUTHORIZATION_FAILED",
                     "VALIDATION_ERROR": "INVALID_REQUEST", "BAD_REQUEST": "INVALID_REQUEST",
                     "NOT_FOUND": "RESOURCE_NOT_FOUND"}


def error_body(surface: Surface, status: int, code: str, message: str,
               param: str | None = None, details: Any = None, path: str | None = None) -> dict[str, Any]:
    if surface is Surface.MANAGEMENT:
        return {"error": {"code": _MANAGEMENT_CODES.get(code, code), "message": message, "details": details},
                "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"), "path": path}
    if surface is Surface.EASYVIZ:
        return {"error": message, "code": code}
    if surface is Surface.SPEC:
        return {"error": {"code": code, "message": message, "details": details}}
    if surface is Surface.OPENAI:
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    body: dict[str, Any] = {"detail": message, "code": code}
    if param:
        body["param"] = param
    return body


def error_response(path: str, status: int, code: str, message: str, *, param: str | None = None,
                   details: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(surface_for_path(path), status, code, message, param, details, path=path)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, list[dict]]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
        problems.append({"param": ".".join(loc) or None, "message": err.get("msg", "invalid value")})
    first = problems[0] if problems else {"param": None, "message": "invalid request"}
    msg = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
    return msg, first["param"], problems


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ChatVLMError)
    async def _ours(request: Request, exc: ChatVLMError) -> JSONResponse:
        if exc.status_code >= 500 and exc.status_code not in (503, 504):
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(request.url.path, exc.status_code, exc.code, exc.message,
                              param=exc.param, details=exc.details, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param, problems = _validation_message(exc)
        # OpenAI (and its SDK's BadRequestError) answers out-of-range values with 400.
        status = 400 if surface_for_path(request.url.path) is Surface.OPENAI else 422
        if surface_for_path(request.url.path) is Surface.MANAGEMENT and any(
                e.get("type") == "json_invalid" for e in exc.errors()):
            status = 400  # not JSON at all: a malformed request, not a failed validation
        return error_response(request.url.path, status, "VALIDATION_ERROR", msg, param=param, details=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "HTTP_ERROR")
        if exc.status_code == 400 and isinstance(exc.detail, str):  # the multipart parser's part caps
            code = next((c for prefix, c in _MULTIPART_CAPS if exc.detail.startswith(prefix)), code)
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ").lower()
        return error_response(request.url.path, exc.status_code, code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex[:12]
        log.exception("unhandled error in %s %s (request %s)", request.method, request.url.path, request_id)
        return error_response(request.url.path, 500, "INTERNAL_ERROR",
                              f"internal server error (request id {request_id})", details={"request_id": request_id})
