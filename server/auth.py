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
import ipaddress
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_response

# ASGI scope key under which the caller's key id (a digest prefix, never the key) is left for
# the rate limiter.
KEY_ID = "chatvlm.api_key_id"

PROBE_PATHS = frozenset({"/health", "/healthz", "/readyz"})
LOGIN_PATH = "/api/auth/token"  # the management login: how a client without a key gets a token
# Checks a bearer token (a management JWT): its principal, or None.
TokenCheck = Callable[[str], Any]
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
    if path in PROBE_PATHS or path == LOGIN_PATH:
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

    def __init__(self, app: ASGIApp, keys: KeyRing, public_docs: bool = False,
                 tokens: TokenCheck | None = None) -> None:
        self.app = app
        self.keys = keys
        self.public_docs = public_docs
        self.tokens = tokens

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
            # A management token (JWT) stands for a key: rate limits count it per user.
            principal = self.tokens(key) if self.tokens is not None else None
            if principal is not None:
                key_id = f"user:{principal.username}"
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


def is_remote(client: tuple[str, int] | None) -> bool:
    """Whether the peer is another machine: an IP address that is not loopback. A Unix socket
    (no address) and in-process test clients (a host name, not an address) are local."""
    if not client:
        return False
    try:
        return not ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class LoopbackGuard:
    """With no API keys configured (and ``allow_unauthenticated_public`` off), only loopback clients
    are served, whatever launched the app (``python api.py``, ``uvicorn api:app --host 0.0.0.0``,
    gunicorn, Ray Serve): a remote client gets 401 saying how to configure keys. Probes and the
    management login stay open, and a valid management token is accepted as authentication."""

    def __init__(self, app: ASGIApp, tokens: TokenCheck | None = None) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not is_remote(scope.get("client")):
            return await self.app(scope, receive, send)
        path = get_route_path(scope)
        if path in PROBE_PATHS or path == LOGIN_PATH:
            return await self.app(scope, receive, send)
        if self.tokens is not None and any(self.tokens(t) is not None for t in presented_keys(scope)):
            return await self.app(scope, receive, send)
        response = error_response(
            path, 401, "UNAUTHORIZED",
            "this server has no API keys configured and serves only its own machine; configure keys "
            "(auth.api_keys in config.yaml, CHATVLM_API_KEYS=key1,key2) and send 'Authorization: Bearer <key>', "
            "log in at POST /api/auth/token and send the token, or set server.allow_unauthenticated_public",
            headers={"WWW-Authenticate": "Bearer"})
        if scope["type"] == "http":
            return await response(scope, receive, send)
        await deny_websocket(scope, send, response)
