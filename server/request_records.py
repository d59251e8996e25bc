"""Pure ASGI middleware: one request record per HTTP request of every surface (route template,
method, model, status, duration, tokens), handed to the batched writer when the response body ends,
so a stream is recorded when it ends. The services fill in the model and the tokens through
``core.request_context``; probes, docs and static files are not recorded."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import request_context
from management.monitor.recorder import RequestRecorder
from server.metrics import UNKNOWN_ROUTE, RouteTemplates

_REQUEST_KEYS = ("type", "path", "root_path", "method", "headers")
# Operational routes polled by load balancers and scrapers: their records would only be noise.
SKIPPED = frozenset({"/health", "/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json",
                     "/docs/oauth2-redirect", UNKNOWN_ROUTE})
SKIPPED_PREFIXES = ("/ui", "/static")


class RequestRecordMiddleware:
    def __init__(self, app: ASGIApp, recorder: RequestRecorder) -> None:
        self.app = app
        self.recorder = recorder
        self._templates: RouteTemplates | None = None
        self._templates_app: object | None = None

    def _template(self, scope: Scope, request: dict) -> str:
        app = scope.get("app")
        if self._templates is None or self._templates_app is not app or self._templates.stale(app):
            self._templates, self._templates_app = RouteTemplates(app), app
        return self._templates.template(request, scope.get("route"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = {k: scope[k] for k in _REQUEST_KEYS if k in scope}  # before routing rewrites it
        ctx, token = request_context.open_context(method=scope.get("method", ""))
        status = 500
        done = False

        def finish() -> None:
            nonlocal done
            if done:
                return
            done = True
            route = self._template(scope, request)
            if route in SKIPPED or route.startswith(SKIPPED_PREFIXES):
                return
            ctx.route = route
            final = status if status >= 400 or ctx.failed_status is None else ctx.failed_status
            self.recorder.record(ctx, final)

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, recording_send)
        finally:
            finish()  # an exception, or a client that left mid-body: recorded with what was known
            request_context.close_context(token)
