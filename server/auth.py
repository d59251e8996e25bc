"""API-key authentication as pure ASGI middleware, for HTTP routes and WebSockets alike.

Keys are held only as SHA-256 digests and compared with ``hmac.compare_digest``. Access is
decided from the routed path (``scope["path"]`` less ``root_path``), never from the Host
header. A refused HTTP request gets 401 in its surface's error shape with
``WWW-Authenticate: Bearer``. A refused WebSocket handshake gets the same 401 as an HTTP
response when the server supports the ASGI WebSocket denial-response extension (uvicorn
does: ``websockets`` clients raise ``InvalidStatus`` with status 401), and is otherwise closed
with code 1008 before it is accepted (the server then answers the handshake with 403).
"""
from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qsl
from typing import Iterable

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_response

# ASGI scope key under which the caller's key id (a digest prefix, never the key) is left for
# the rate limiter.
KEY_ID = "chatvlm.api_key_id"

PROBE_PATHS = frozenset({"/health", "/healthz", "/readyz"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
DOCS_ASSETS = "/static-offline-docs/"
# The playground's static files: the page loads without a key and asks for one; every API
# call it makes is checked like any other client's.
UI_PATH = "/ui"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """The accepted keys' digests. ``match`` checks every digest, so timing does not tell which."""

    def __init__(self, hex_digests: Iterable[str]) -> None:
        self._digests = [bytes.fromhex(d) for d in hex_digests]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, key: str) -> str | None:
        """The key's id (a digest prefix) when the key is accepted, else None."""
        presented = digest(key)
        found = False
        for stored in self._digests:
            found |= hmac.compare_digest(presented, stored)
        return presented.hex()[:16] if found else None


def presented_keys(scope: Scope) -> list[str]:
    """Keys the request carries: ``Authorization: Bearer <key>`` and ``X-API-Key: <key>``, and on a
    WebSocket handshake also ``?token=<key>`` (a browser cannot set headers on a WebSocket)."""
    keys = []
    if scope["type"] == "websocket":
        keys += [v for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")) if k == "token" and v]
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                keys.append(token.strip())
        elif name == b"x-api-key":
            token = value.decode("latin-1").strip()
            if token:
                keys.append(token)
    return keys


def is_public(path: str, public_docs: bool) -> bool:
    if path in PROBE_PATHS:
        return True
    if path == UI_PATH or (path.startswith(UI_PATH + "/") and "/.." not in path and "//" not in path):
        return True
    if not public_docs:
        return False
    if path in DOCS_PATHS:
        return True
    # Static docs assets; a dot segment never routes out of the mount, but refuse it anyway.
    return path.startswith(DOCS_ASSETS) and "/.." not in path and "//" not in path


class AuthMiddleware:
    """401 for every HTTP request and WebSocket without a valid key, except the public paths."""

    def __init__(self, app: ASGIApp, keys: KeyRing, public_docs: bool = False) -> None:
        self.app = app
        self.keys = keys
        self.public_docs = public_docs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys:
            return await self.app(scope, receive, send)
        path = get_route_path(scope)
        candidates = presented_keys(scope)
        key_id = None
        for key in candidates:
            key_id = self.keys.match(key)
            if key_id:
                break
        if key_id:
            scope[KEY_ID] = key_id
            return await self.app(scope, receive, send)
        if is_public(path, self.public_docs):
            return await self.app(scope, receive, send)
        if candidates:
            message, challenge = "invalid API key", 'Bearer error="invalid_token"'
        else:
            message, challenge = ("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                                  "Bearer")
        response = error_response(path, 401, "UNAUTHORIZED", message, headers={"WWW-Authenticate": challenge})
        if scope["type"] == "http":
            return await response(scope, receive, send)
        await deny_websocket(scope, send, response)


async def deny_websocket(scope: Scope, send: Send, response) -> None:
    """Refuse a WebSocket handshake with an HTTP response when the server can send one, else close 1008."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": response.status_code,
                    "headers": response.raw_headers})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 1008})
