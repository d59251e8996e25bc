"""Replicas of the server on Ray Serve, built from the app factory (server/app.py ``create_app``).

Each replica is a whole server: its own models in memory, its own engine, its own lifespan tasks
(job workers, registry refresh). What they share comes from settings, not from Ray:
``database.url`` (PostgreSQL: users, the registry, jobs) and ``rate_limit.storage_url`` (Redis:
rate limits, the login throttle). Every response carries ``X-Replica-Id`` (WebSocket handshakes
too), so a client or a test can see which replica answered.

Run it (the nodes started from the repository root, or with it on PYTHONPATH):

    serve run deploy.ray_serve:app                                 # options from CHATVLM_RAY_* variables
    serve run deploy.ray_serve:build_app replicas=2 num_cpus=1     # or as builder arguments
    serve deploy deploy/ray_serve.yaml                             # a running cluster, from a YAML config

Builder arguments (strings from the command line, typed values from YAML; variables in brackets):
    replicas                 fixed number of replicas [CHATVLM_RAY_REPLICAS, default 1]
    min_replicas, max_replicas, target_ongoing_requests
                             autoscaling instead of a fixed number (set max_replicas to turn it on)
    num_cpus, num_gpus       Ray resources each replica reserves [CHATVLM_RAY_NUM_CPUS=1, _NUM_GPUS=0]
    max_ongoing_requests     requests Serve sends one replica at once [default 64]
    max_replicas_per_node    spread replicas over nodes (e.g. 1: one per GPU machine)
    config                   config.yaml path on the nodes [CHATVLM_CONFIG]; CHATVLM_* variables apply as usual
"""
from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.serve import Application

REPLICA_HEADER = b"x-replica-id"


class ReplicaIdMiddleware:
    """Adds ``X-Replica-Id`` to every HTTP response and WebSocket handshake (pure ASGI: streams untouched)."""

    def __init__(self, app, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER, replica_id.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)

        async def send_with_id(message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.http.response.start"):
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


@serve.deployment(name="chatvlm", graceful_shutdown_timeout_s=30, health_check_period_s=10)
@serve.ingress()
class ChatVLMReplica:
    """One replica: settings are read and the app is built on the replica, never in the driver."""

    def __init__(self, config: str | None = None) -> None:
        self.config = config or os.environ.get("CHATVLM_CONFIG")

    def __serve_build_asgi_app__(self):
        from api import create_app  # also points library caches into the data directory
        from core.config import load_settings

        app = create_app(load_settings(self.config))
        replica = serve.get_replica_context().replica_id.unique_id
        app.add_middleware(ReplicaIdMiddleware, replica_id=replica)  # outermost: 413s and 429s carry it too
        return app


def _arg(args: dict[str, Any], key: str, cast=int, default=None):
    value = args.get(key, os.environ.get(f"CHATVLM_RAY_{key.upper()}"))
    return default if value in (None, "") else cast(value)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Serve application with its options (see the module docstring)."""
    args = dict(args or {})
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": _arg(args, "num_cpus", float, 1.0),
                              "num_gpus": _arg(args, "num_gpus", float, 0.0)},
        "max_ongoing_requests": _arg(args, "max_ongoing_requests", int, 64),
    }
    per_node = _arg(args, "max_replicas_per_node", int)
    if per_node:
        options["max_replicas_per_node"] = per_node
    max_replicas = _arg(args, "max_replicas", int)
    if max_replicas:
        options["autoscaling_config"] = {"min_replicas": _arg(args, "min_replicas", int, 1),
                                         "max_replicas": max_replicas,
                                         "target_ongoing_requests": _arg(args, "target_ongoing_requests", float, 8)}
    else:
        options["num_replicas"] = _arg(args, "replicas", int, 1)
    return ChatVLMReplica.options(**options).bind(args.get("config"))


app = build_app()  # `serve run deploy.ray_serve:app`: a description only; nothing loads until a replica starts
