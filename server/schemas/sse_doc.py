"""OpenAPI for Server-Sent Events responses, one helper for every streaming surface.

FastAPI emits OpenAPI 3.1, where the ``schema`` of a ``text/event-stream`` media type describes
ONE event as a parsed object: ``data`` (the joined ``data:`` lines), ``event``, ``id``, ``retry``.
A JSON payload is declared on ``data`` with ``contentMediaType: application/json`` and its
``contentSchema``; plain-text end markers such as ``[DONE]`` are ``const`` branches of an ``anyOf``
beside it. Payload schemas come from the pydantic models of the events, with their ``$defs``
inlined so the schema stands alone wherever it is placed in the document.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

Schema = dict[str, Any]
PayloadSpec = type[BaseModel] | Schema


def model_schema(model: type[BaseModel]) -> Schema:
    """The model's serialization JSON schema, self-contained (no ``$ref`` into ``$defs``)."""
    schema = model.model_json_schema(mode="serialization")
    defs = schema.pop("$defs", {})
    return _inline(schema, defs)


def _inline(node: Any, defs: dict[str, Schema]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return {**_inline(defs[ref.removeprefix("#/$defs/")], defs), **_inline(rest, defs)}
    return {k: _inline(v, defs) for k, v in node.items()}


def _schema(spec: PayloadSpec) -> Schema:
    return model_schema(spec) if isinstance(spec, type) else spec


def json_data(*payloads: PayloadSpec, description: str | None = None) -> Schema:
    """``data`` holding a JSON document that matches one of ``payloads`` (models or schemas)."""
    schemas = [_schema(p) for p in payloads]
    content = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    data: Schema = {"type": "string", "contentMediaType": "application/json", "contentSchema": content}
    if description:
        data["description"] = description
    return data


def marker(value: str, description: str) -> Schema:
    """A plain-text ``data`` value sent as is (an end marker such as ``[DONE]``)."""
    return {"type": "string", "const": value, "description": description}


def event_schema(*data: Schema, title: str | None = None) -> Schema:
    """One parsed SSE event whose ``data`` matches one of ``data``."""
    schema: Schema = {
        "type": "object",
        "properties": {
            "data": data[0] if len(data) == 1 else {"anyOf": list(data)},
            "event": {"type": "string", "description": "Always the default, 'message'"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
        "required": ["data"],
    }
    if title:
        schema["title"] = title
    return schema


def sse_response(description: str, *data: Schema, example: str, title: str | None = None,
                 status: int = 200) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entry of a route that streams: its ``text/event-stream`` content.
    FastAPI adds the route's JSON ``response_model`` beside it when the route has one."""
    return {status: {"description": description,
                     "content": {"text/event-stream": {"schema": event_schema(*data, title=title),
                                                       "example": example}}}}
