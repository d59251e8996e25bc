"""Prometheus metrics: one registry per app, the HTTP middleware that feeds it, and ``GET /metrics``.

Every metric lives in the app's own ``CollectorRegistry`` (never the process-global one), so
several apps built in one test process do not clash. Labels stay bounded: HTTP requests are
labelled by route *template* (``/models/{model_name}``), never by raw path, and model labels
are registry ids.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNKNOWN_ROUTE = "other"

# Seconds. HTTP covers quick JSON answers to long streams; inference starts where the seed's
# example buckets (1, 3, 5) sit and goes to the request deadline range.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
INFERENCE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
FINISH_REASONS = frozenset({"stop", "length", "cancelled", "error", "timeout"})
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """All metric objects of one app, and the methods the engine and the model manager call.

    The methods are cheap and thread-safe (the engine calls them from its worker thread).
    State gauges (active connections, loaded models) are read from callbacks at scrape time
    when callbacks are given, so they can never drift from the source of truth.
    """

    def __init__(self, *, active_connections: Callable[[], int] | None = None,
                 loaded_models: Callable[[], Iterable[str]] | None = None,
                 known_models: Callable[[], Iterable[str]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self._active_cb = active_connections
        self._loaded_cb = loaded_models
        self._known_cb = known_models
        self._lock = threading.Lock()
        self._active = 0                       # counted by MetricsMiddleware
        self._loaded: dict[str, bool] = {}     # pushed by set_loaded()
        r = self.registry
        self.http_requests = Counter("http_requests_total", "HTTP requests by route template, method and status",
                                     ("route", "method", "status"), registry=r)
        self.http_duration = Histogram("http_request_duration_seconds",
                                       "HTTP request time from arrival to the end of the response body",
                                       ("route",), buckets=HTTP_BUCKETS, registry=r)
        self.inference = Histogram("model_inference_seconds", "Model inference time per request",
                                   ("model",), buckets=INFERENCE_BUCKETS, registry=r)
        self.ttft = Histogram("generation_time_to_first_token_seconds", "Time from request to first generated token",
                              ("model",), buckets=TTFT_BUCKETS, registry=r)
        self.completion_tokens = Counter("generation_tokens_total", "Generated (completion) tokens",
                                         ("model",), registry=r)
        self.prompt_tokens = Counter("generation_prompt_tokens_total", "Prompt tokens processed",
                                     ("model",), registry=r)
        self.generations = Counter("generation_requests_total", "Finished generations by finish reason",
                                   ("model", "finish_reason"), registry=r)
        self.queue_depth = Gauge("engine_queue_depth", "Requests waiting in the engine queue",
                                 ("model",), registry=r)
        self.batch_size = Gauge("engine_batch_size", "Sequences in the engine's current batch",
                                ("model",), registry=r)
        self.batch_sizes = Histogram("engine_batch_size_per_step", "Sequences per non-empty engine step",
                                     ("model",), buckets=BATCH_BUCKETS, registry=r)
        self.load_time = Histogram("model_load_seconds", "Model load time", ("model",),
                                   buckets=LOAD_BUCKETS, registry=r)
        r.register(_StateCollector(self))

    # ---- called by the engine / services ---------------------------------------
    def observe_generation(self, model: str, ttft_s: float | None, total_s: float, prompt_tokens: int,
                           completion_tokens: int, finish_reason: str | None = None) -> None:
        """One finished generation: latency, time to first token (None if no token came) and token counts.

        Cancelled and failed generations count their tokens and their outcome, but stay out of the
        latency histograms, which would otherwise show how long clients waited before giving up."""
        if finish_reason not in ("cancelled", "error"):
            self.inference.labels(model).observe(max(total_s, 0.0))
            if ttft_s is not None:
                self.ttft.labels(model).observe(max(ttft_s, 0.0))
        if prompt_tokens > 0:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
        if completion_tokens > 0:
            self.completion_tokens.labels(model).inc(completion_tokens)
        reason = finish_reason if finish_reason in FINISH_REASONS else ("unknown" if finish_reason is None else "other")
        self.generations.labels(model, reason).inc()

    def observe_inference(self, model: str, seconds: float) -> None:
        """One inference that is not a token generation (an OCR engine, a non-streamed model call)."""
        self.inference.labels(model).observe(max(seconds, 0.0))

    def set_queue_depth(self, model: str, n: int) -> None:
        """Requests waiting for the engine of this model."""
        self.queue_depth.labels(model).set(n)

    def set_batch_size(self, model: str, n: int) -> None:
        """Sequences in the current step; non-empty steps also go to the per-step histogram."""
        self.batch_size.labels(model).set(n)
        if n > 0:
            self.batch_sizes.labels(model).observe(n)

    def set_loaded(self, model: str, loaded: bool) -> None:
        """Push a model's loaded state (used when no loaded_models callback was given)."""
        with self._lock:
            self._loaded[model] = bool(loaded)

    def observe_load(self, model: str, seconds: float) -> None:
        """One successful model load."""
        self.load_time.labels(model).observe(max(seconds, 0.0))

    # ---- called by the middleware ------------------------------------------------
    def _connection_opened(self) -> None:
        with self._lock:
            self._active += 1

    def _connection_closed(self) -> None:
        with self._lock:
            self._active -= 1

    # ---- read at scrape time -----------------------------------------------------
    def active_connections(self) -> int:
        return int(self._active_cb()) if self._active_cb is not None else self._active

    def model_states(self) -> dict[str, bool]:
        """model id -> loaded, for every model we know of."""
        if self._loaded_cb is None:
            with self._lock:
                return dict(self._loaded)
        loaded = set(self._loaded_cb())
        known = set(self._known_cb()) if self._known_cb is not None else set()
        return {m: m in loaded for m in sorted(known | loaded)}

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics when the scraper asks for it) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _StateCollector(Collector):
    """Gauges computed from current state when scraped rather than kept up to date."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self):
        return [GaugeMetricFamily("active_connections", ""), GaugeMetricFamily("models_loaded", ""),
                GaugeMetricFamily("model_loaded", "", labels=("model",))]

    def collect(self):
        states = self.metrics.model_states()
        yield GaugeMetricFamily("active_connections", "HTTP requests and WebSockets in progress",
                                value=self.metrics.active_connections())
        yield GaugeMetricFamily("models_loaded", "Models loaded in memory", value=sum(states.values()))
        per_model = GaugeMetricFamily("model_loaded", "1 if the model is loaded, else 0", labels=("model",))
        for model, loaded in states.items():
            per_model.add_metric((model,), 1 if loaded else 0)
        yield per_model


class RouteTemplates:
    """Maps a request to its route's full path template ("/api/v1/models/{name}/load").

    FastAPI (>= 0.137) keeps included routers lazy: ``scope["route"]`` is the APIRoute as
    declared, without the include prefix, and ``app.routes`` holds pathless wrappers. So the
    table is built from ``fastapi.routing.iter_route_contexts`` (what OpenAPI uses), whose
    entries carry the prefixed template and match like the router does.
    """

    def __init__(self, app) -> None:
        self.routes = list(getattr(app, "routes", ()))
        contexts = _route_contexts(self.routes)
        self.entries = [(ctx, getattr(ctx, "path_format", None) or UNKNOWN_ROUTE) for ctx in contexts]
        self.by_route: dict[int, list] = {}
        for ctx, template in self.entries:
            original = getattr(ctx, "original_route", ctx)
            self.by_route.setdefault(id(original), []).append((ctx, template))

    def stale(self, app) -> bool:
        return len(getattr(app, "routes", ())) != len(self.routes)

    def template(self, request: Scope, routed: object | None) -> str:
        """``request``: the scope as it arrived (routing mutates paths); ``routed``: scope["route"] if any."""
        candidates = self.by_route.get(id(routed)) if routed is not None else None
        if candidates and len(candidates) == 1:
            return candidates[0][1]
        partial = None
        for ctx, template in candidates or self.entries:
            try:
                match, _ = ctx.matches(request)
            except Exception:  # a route that cannot judge this request does not match it
                continue
            if match is Match.FULL:
                return template
            if match is Match.PARTIAL and partial is None:
                partial = template
        return partial or UNKNOWN_ROUTE


def _route_contexts(routes: list) -> list:
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before lazy include_router: routes are flat and prefixed
        return routes
    return list(iter_route_contexts(routes))


_REQUEST_KEYS = ("type", "path", "root_path", "method", "headers")


class MetricsMiddleware:
    """Pure ASGI: HTTP requests by route template, method and status, their duration, and the
    connections in progress (HTTP and WebSocket). The body passes through unbuffered: the
    status is counted when the response starts, the duration when the body ends."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._templates: RouteTemplates | None = None
        self._templates_app: object | None = None

    def _route_table(self, app: object) -> RouteTemplates:
        if self._templates is None or self._templates_app is not app or self._templates.stale(app):
            self._templates, self._templates_app = RouteTemplates(app), app
        return self._templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            self.metrics._connection_opened()
            try:
                return await self.app(scope, receive, send)
            finally:
                self.metrics._connection_closed()
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        metrics = self.metrics
        start = time.perf_counter()
        request = {k: scope[k] for k in _REQUEST_KEYS if k in scope}  # before routing rewrites it
        route: str | None = None
        counted = False
        timed = False

        def route_label() -> str:
            nonlocal route
            if route is None:
                route = self._route_table(scope.get("app")).template(request, scope.get("route"))
            return route

        def count(status: int) -> None:
            nonlocal counted
            if not counted:
                counted = True
                method = request["method"] if request["method"] in HTTP_METHODS else "other"
                metrics.http_requests.labels(route_label(), method, str(status)).inc()

        def time_it() -> None:
            nonlocal timed
            if not timed:
                timed = True
                metrics.http_duration.labels(route_label()).observe(time.perf_counter() - start)

        async def recording_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                count(int(message["status"]))
            await send(message)
            if kind == "http.response.body" and not message.get("more_body", False):
                time_it()

        metrics._connection_opened()
        try:
            await self.app(scope, receive, recording_send)
        except Exception:
            count(500)  # no-op once a response started; otherwise the server's error handler answers 500
            raise
        finally:
            time_it()  # a client that went away mid-body still took this long
            metrics._connection_closed()


router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition (OpenMetrics when asked for in Accept)",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics: HTTP traffic, inference latency, tokens, engine queue and loaded models."""
    body, content_type = request.app.state.metrics.render(request.headers.get("accept"))
    return Response(content=body, media_type=content_type)
