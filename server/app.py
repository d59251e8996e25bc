"""The app factory: builds the FastAPI app from typed settings. Nothing is loaded at import."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from core.config import Settings
from core.cores import SHARE
from core.memory import IdleTrimmer
from server.auth import AuthMiddleware, KeyRing, LoopbackGuard
from server.deps import build_services
from server.errors import install_error_handlers
from server.metrics import MetricsMiddleware
from server.metrics import router as metrics_router
from server.middleware import BodyLimitMiddleware, ConnectionCounter
from server.openapi import install_openapi
from server.ratelimit import RateLimiter, RateLimitMiddleware, charge_images
from server.request_records import RequestRecordMiddleware
from server.routers import easyviz, jobs, llama_local, openai_compat, spec_v1, system, vision
from server.routers import management
from server.routers import pages as page_images
from server.routers import ui as playground
from server.uploads import upload_form_limits

log = logging.getLogger("chatvlm")

MULTIPART_OVERHEAD = 1024 * 1024  # form fields and part headers beside the files


def create_app(settings: Settings) -> FastAPI:
    services = build_services(settings)
    SHARE.enabled = settings.server.share_cpu_threads  # one process, one CPU to share (core/cores.py)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await services.management.start()  # the store first: desired states decide what loads
        await services.manager.start(settings.manager.preload)
        await services.jobs.start(services.management.db)  # jobs live in the management database
        trimmer = IdleTrimmer(lambda: services.connections.active > 0 or services.manager.any_busy(),
                              settings.server.idle_trim_s)
        trimmer.start()
        try:
            yield
        finally:
            services.draining = True
            await trimmer.stop()
            await services.jobs.stop()
            try:
                await services.management.stop()
                await services.manager.shutdown()
            finally:
                await services.image_fetcher.close()

    # Swagger UI and ReDoc assets come from a package, not a CDN: the docs work offline.
    app = FastAPIOffline(title="ChatVLMLLM API", version=system.VERSION, lifespan=lifespan,
                         # multipart part caps; single-file routes lower max_files to 1
                         form_limits=upload_form_limits(settings.limits.max_batch_files),
                         description="OCR and visual question answering with vision-language models, "
                                     "behind the ChatVLMLLM, LLaMA-Local, EasyVizAI, spec-v1 and OpenAI APIs.")
    app.state.services = services
    app.state.metrics = services.metrics
    install_error_handlers(app)
    for surface in (system, vision, llama_local, spec_v1, openai_compat, easyviz):
        # Images are counted once the body is parsed, on the surfaces that take images.
        images = [Depends(charge_images)] if surface in (vision, openai_compat) else None
        app.include_router(surface.router, dependencies=images)
    app.include_router(jobs.router, dependencies=[Depends(charge_images)])
    app.include_router(management.router)
    app.include_router(metrics_router)
    app.include_router(page_images.router, dependencies=[Depends(charge_images)])
    playground.mount(app)  # static files at /ui (public, like the probes; its API calls need a key)
    install_openapi(app, settings)

    limits = settings.limits

    def body_limit(path: str) -> int:
        if path == "/batch/ocr":
            return limits.max_batch_files * limits.max_file_bytes + MULTIPART_OVERHEAD
        if path == "/jobs/ocr":  # long documents: the jobs' own file cap
            return settings.jobs.max_file_bytes + MULTIPART_OVERHEAD
        # One file, as multipart or as base64 inside JSON (4 characters per 3 bytes).
        return limits.max_file_bytes * 4 // 3 + MULTIPART_OVERHEAD

    # Added innermost first: metrics > connection counter > body limit > auth > rate limit > app.
    if settings.rate_limit.enabled:
        app.state.rate_limiter = RateLimiter(settings.rate_limit)
        app.add_middleware(RateLimitMiddleware, limiter=app.state.rate_limiter)
    app.state.keys = KeyRing(settings.auth.api_key_sha256)
    tokens = services.management.identity.verify
    if settings.auth.enabled:
        app.add_middleware(AuthMiddleware, keys=app.state.keys, public_docs=settings.auth.public_docs, tokens=tokens)
    elif not settings.server.allow_unauthenticated_public:
        app.add_middleware(LoopbackGuard, tokens=tokens)
    app.add_middleware(BodyLimitMiddleware, limit_for_path=body_limit)
    app.add_middleware(ConnectionCounter, stats=services.connections)
    # One request record per request of every surface (written in batches, streams when they end).
    app.add_middleware(RequestRecordMiddleware, recorder=services.management.recorder)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)  # outermost: sees 413s and whole streams
    return app
