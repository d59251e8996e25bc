"""Entry point: ``python api.py [--host H] [--port P] [--config FILE] [--models-dir DIR]``,
``uvicorn api:app`` or ``uvicorn --factory api:create_app``.

Settings come from config.yaml < CHATVLM_* environment < these flags.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import threading
from pathlib import Path

from core.config import ConfigError, Settings, load_settings
from core.memory import limit_arenas


def _prepare_environment(settings: Settings) -> None:
    """Keep library caches in the data directory so a read-only HOME does not break start-up."""
    cache = settings.cache_path.resolve()
    os.environ.setdefault("HF_HOME", str(cache / "huggingface"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def create_app(settings: Settings | None = None):
    """Build the app from settings (default: config.yaml and the environment)."""
    from server.app import create_app as _create

    settings = settings or load_settings(os.environ.get("CHATVLM_CONFIG"))
    _prepare_environment(settings)
    return _create(settings)


def __getattr__(name: str):
    # ``uvicorn api:app`` asks for ``app``; building it here keeps import side-effect free.
    if name == "app":
        return create_app()
    raise AttributeError(name)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _public_bind_refusal(settings: Settings) -> str | None:
    """Why the server must not start: no API keys on a non-loopback host, unless allowed."""
    host = settings.server.host
    if settings.auth.enabled or _is_loopback(host) or settings.server.allow_unauthenticated_public:
        return None
    return (f"refusing to serve {host} without authentication: anyone who can reach it could use it. "
            "Set API keys (auth.api_keys in config.yaml, CHATVLM_API_KEYS=key1,key2 or "
            "CHATVLM_AUTH__API_KEYS='[\"key\"]'), bind to 127.0.0.1, or pass "
            "--allow-unauthenticated-public (server.allow_unauthenticated_public: true) to accept the risk.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ChatVLMLLM server")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--config", type=Path, default=os.environ.get("CHATVLM_CONFIG"))
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--allow-unauthenticated-public", action="store_true", default=None,
                        help="serve a non-loopback host with no API keys configured (not advised)")
    args = parser.parse_args(argv)
    server = {k: v for k, v in (("host", args.host), ("port", args.port),
                                ("allow_unauthenticated_public", args.allow_unauthenticated_public))
              if v is not None}
    try:
        settings = load_settings(args.config, models_dir=args.models_dir, server=server or None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if refusal := _public_bind_refusal(settings):
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.server.malloc_arena_max:
        limit_arenas(settings.server.malloc_arena_max)  # before any worker thread allocates
    import uvicorn

    app = create_app(settings)

    announce = settings.server.drain_announce_s

    class DrainingServer(uvicorn.Server):
        announcing: threading.Timer | None = None

        def handle_exit(self, sig, frame) -> None:
            services = app.state.services
            if announce > 0 and not services.draining:
                # /readyz answers 503 while everything else still serves; then stop accepting.
                services.draining = True
                self.announcing = threading.Timer(announce, super().handle_exit, (sig, frame))
                self.announcing.daemon = True
                self.announcing.start()
                return
            if self.announcing is not None:
                self.announcing.cancel()  # a second signal: stop now
            services.draining = True  # /readyz turns 503 at once, before connections close
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                            log_level=settings.server.log_level,
                            timeout_graceful_shutdown=settings.server.graceful_timeout_s)
    DrainingServer(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
