"""What routes need, as Annotated dependency aliases over the app's service container."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from core.config import Settings
from core.remote_images import ImageFetcher
from llm.embeddings import EmbeddingService
from jobs.service import JobService
from jobs.store import DbJobStore
from llm.service import GenerationService
from management.service import Management
from models.manager import ModelManager
from models.registry import ModelRegistry
from models.selection import ModelSelector
from ocr.service import ImageDecoder, OcrService
from server.metrics import Metrics
from server.middleware import ConnectionStats
from vlm.service import ChatService


@dataclass
class Services:
    settings: Settings
    registry: ModelRegistry
    manager: ModelManager
    selector: ModelSelector
    decoder: ImageDecoder
    ocr: OcrService
    chat: ChatService
    llm: GenerationService
    embeddings: EmbeddingService
    connections: ConnectionStats
    metrics: Metrics
    image_fetcher: ImageFetcher
    jobs: JobService | None = None  # asynchronous OCR jobs (started and stopped by the app's lifespan)
    management: Management | None = None  # the management surface (seed 004); opened by the lifespan
    draining: bool = False  # set when shutdown starts: /readyz answers 503


def build_services(settings: Settings) -> Services:
    """Wire the layers together. Cheap: nothing is loaded here."""
    registry = ModelRegistry(settings)
    connections = ConnectionStats()
    # The callbacks are read at scrape time, when `manager` exists.
    metrics = Metrics(active_connections=lambda: connections.active,
                      loaded_models=lambda: manager.loaded_ids(),
                      known_models=lambda: [e.id for e in registry.entries()])
    manager = ModelManager(registry, memory_budget_mb=settings.manager.memory_budget_mb,
                           idle_unload_s=settings.manager.idle_unload_s,
                           idle_check_s=settings.manager.idle_check_s, metrics=metrics,
                           max_loaded=settings.manager.max_loaded_models)
    selector = ModelSelector(registry, ocr_fallback=settings.routing.ocr_fallback)
    decoder = ImageDecoder(settings.limits)
    llm = GenerationService(selector, manager, decoder, settings.limits)
    image_urls = settings.image_urls
    image_fetcher = ImageFetcher(image_urls, int(image_urls.max_mb * 2**20) if image_urls.max_mb
                                 else settings.limits.max_file_bytes)
    ocr = OcrService(selector, manager, decoder, settings.limits, llm)
    # In the management database (bound when the lifespan opens it): shared by replicas on PostgreSQL.
    jobs = JobService(DbJobStore(settings.jobs.lease_s), ocr, settings.jobs, settings.limits)
    management = Management(settings, manager)
    jobs.on_record = management.recorder.record  # each job's run is a request record of its own
    return Services(settings=settings, registry=registry, manager=manager, selector=selector, decoder=decoder,
                    ocr=ocr, jobs=jobs,
                    chat=ChatService(selector, llm, decoder, settings.limits),
                    llm=llm, embeddings=EmbeddingService(selector, manager,
                                                         timeout_s=settings.limits.request_timeout_s),
                    connections=connections, metrics=metrics,
                    image_fetcher=image_fetcher, management=management)


# Dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency on its thread
# pool, one hop per request, which under load waits behind every other request's hops.
async def _services(conn: HTTPConnection) -> Services:
    return conn.app.state.services


ServicesDep = Annotated[Services, Depends(_services)]
