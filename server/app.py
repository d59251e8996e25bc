"""The app factory: builds the FastAPI app from typed settings. Nothing is loaded at import."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from core.config import Settings
from server.deps import build_services
from server.errors import install_error_handlers
from server.metrics import MetricsMiddleware
from server.metrics import router as metrics_router
from server.middleware import BodyLimitMiddleware, ConnectionCounter
from server.routers import easyviz, llama_local, openai_compat, spec_v1, system, vision

log = logging.getLogger("chatvlm")

MULTIPART_OVERHEAD = 1024 * 1024  # form fields and part headers beside the files


def create_app(settings: Settings) -> FastAPI:
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await services.manager.start(settings.manager.preload)
        try:
            yield
        finally:
            services.draining = True
            await services.manager.shutdown()

    # Swagger UI and ReDoc assets come from a package, not a CDN: the docs work offline.
    app = FastAPIOffline(title="ChatVLMLLM API", version=system.VERSION, lifespan=lifespan,
                  description="OCR and visual question answering with vision-language models, "
                              "behind the ChatVLMLLM, LLaMA-Local, EasyVizAI, spec-v1 and OpenAI APIs.")
    app.state.services = services
    app.state.metrics = services.metrics
    install_error_handlers(app)
    for surface in (system, vision, llama_local, spec_v1, openai_compat, easyviz):
        app.include_router(surface.router)
    app.include_router(metrics_router)

    limits = settings.limits

    def body_limit(path: str) -> int:
        if path == "/batch/ocr":
            return limits.max_batch_files * limits.max_file_bytes + MULTIPART_OVERHEAD
        # One file, as multipart or as base64 inside JSON (4 characters per 3 bytes).
        return limits.max_file_bytes * 4 // 3 + MULTIPART_OVERHEAD

    app.add_middleware(BodyLimitMiddleware, limit_for_path=body_limit)
    app.add_middleware(ConnectionCounter, stats=services.connections)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)  # outermost: sees 413s and whole streams
    return app
