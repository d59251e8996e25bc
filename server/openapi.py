"""The answers every route can give that no route declares itself: they come from the
middleware (API keys, rate limits, body caps) and from the body parser. Added to every
operation of /openapi.json in one place, in each surface's error shape, so a client (or
schemathesis) finds every status and header documented.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from core.config import LimitsSettings, Settings
from server.auth import PROBE_PATHS
from server.errors import Surface, surface_for_path
from server.schemas.easyviz import LlmError
from server.schemas.openai_responses import OpenAIError
from server.schemas.spec_v1 import SpecError
from server.schemas.vision import ErrorDetail
from server.routers.management.common import ManagementError

_ERROR_MODELS: dict[Surface, type[BaseModel]] = {
    Surface.VISION: ErrorDetail, Surface.EASYVIZ: LlmError, Surface.SPEC: SpecError, Surface.OPENAI: OpenAIError,
    Surface.MANAGEMENT: ManagementError}

_INT = {"type": "integer"}
RATE_HEADERS = {
    "X-RateLimit-Limit": {"description": "Requests allowed per minute (when rate limits are configured)",
                          "schema": _INT},
    "X-RateLimit-Remaining": {"description": "Requests left in the current minute", "schema": _INT},
    "X-RateLimit-Reset": {"description": "When the minute's window resets (epoch seconds)", "schema": _INT},
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": _INT}}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Replace ``app.openapi`` with one that completes every operation's responses."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            complete_responses(schema, rate_limited=settings.rate_limit.enabled)
            document_uploads(schema, settings.limits)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete_responses(schema: dict[str, Any], *, rate_limited: bool) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, item in schema.get("paths", {}).items():
        surface = surface_for_path(path)
        ref = _error_ref(_ERROR_MODELS[surface], components)
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            responses = op.setdefault("responses", {})
            if surface is Surface.OPENAI:  # this surface answers validation errors with 400
                responses.pop("422", None)
            _add(responses, "400" if "requestBody" in op else None, ref,
                 "Malformed request body (not parseable as its content type, or past a multipart part cap)")
            if path in PROBE_PATHS:
                continue
            _add(responses, "401", ref, "Missing or unknown API key (when API keys are configured)")
            _add(responses, "413" if "requestBody" in op else None, ref, "Request body too large")
            _add(responses, "429", ref, "Rate limit reached (when rate limits are configured)",
                 headers=RETRY_AFTER)
            if "503" in responses:
                responses["503"].setdefault("headers", {}).update(RETRY_AFTER)
            if rate_limited:
                for answer in responses.values():
                    answer.setdefault("headers", {}).update(RATE_HEADERS)


def _error_ref(model: type[BaseModel], components: dict[str, Any]) -> dict[str, str]:
    if model.__name__ not in components:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in body.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = body
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _add(responses: dict[str, Any], status: str | None, ref: dict[str, str], description: str, *,
         headers: dict[str, Any] | None = None) -> None:
    if status is None or status in responses:
        return
    answer: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ref}}}
    if headers:
        answer["headers"] = dict(headers)
    responses[status] = answer


_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp", "TIFF": "image/tiff",
                "PDF": "application/pdf"}


def document_uploads(schema: dict[str, Any], limits: LimitsSettings) -> None:
    """The configured caps on multipart file parts: non-empty, at most max_file_mb each, at
    most max_batch_files of them, and only the allowed formats' media types."""
    allowed = {_MEDIA_TYPES[f] for f in limits.allowed_formats}
    components = schema.get("components", {}).get("schemas", {})
    for item in schema.get("paths", {}).values():
        for op in item.values():
            form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data") if isinstance(op, dict) else None
            if not form:
                continue
            ref = form.get("schema", {}).get("$ref", "")
            body = components.get(ref.rsplit("/", 1)[-1], form.get("schema", {}))
            for name, prop in body.get("properties", {}).items():
                _not_null(prop)  # a multipart field is present or absent: it cannot carry a JSON null
                part = prop.get("items", prop) if prop.get("type") == "array" else prop
                if part.get("contentMediaType") != "application/octet-stream" and part.get("format") != "binary":
                    continue
                part.update(minLength=1, maxLength=limits.max_file_bytes)
                if part is not prop:
                    prop.update(minItems=1, maxItems=limits.max_batch_files)
                encoding = form.get("encoding", {}).get(name)
                if encoding and "contentType" in encoding:
                    kept = [t.strip() for t in encoding["contentType"].split(",") if t.strip() in allowed]
                    encoding["contentType"] = ", ".join(kept)


def _not_null(prop: dict[str, Any]) -> None:
    branches = prop.get("anyOf")
    if not branches:
        return
    kept = [b for b in branches if b.get("type") != "null"]
    if len(kept) == 1:
        del prop["anyOf"]
        prop.update(kept[0])
    else:
        prop["anyOf"] = kept
