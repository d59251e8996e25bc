"""Spec v1 surface (seed 002, ``/api/v1``): generate (JSON or SSE), stream, batch, and the model
list with load and unload. Errors are ``{"error": {"code", "message", "details"}}`` (server.errors)."""
from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Body
from sse_starlette.sse import EventSourceResponse

from core.errors import ChatVLMError, ServerError
from core.system import gpu_info, human_bytes
from llm.service import GenerationService
from llm.types import GenerateInput
from server.deps import ServicesDep
from server.model_listing import model_rows, resolved_device
from server.schemas.llama_local import UsageBody
from server.schemas.spec_v1 import (BatchError, BatchRequest, BatchResponse, BatchResult, ErrorInfo,
                                    GenerateRequest, GenerateResponse, GenerationFields, LoadRequest, LoadResponse,
                                    ModelItem, ModelsResponse, UnloadResponse, V1StreamSerializer, error_responses,
                                    streamed_200)
from server.sse import sse_response

log = logging.getLogger("chatvlm.spec_v1")

router = APIRouter(prefix="/api/v1", tags=["spec-v1"])

_GEN_ERRORS = error_responses(400, 404, 422, 502, 503, 504)
_STREAM_DOC = ('`data: {"token": "...", "finished": false}` events; the last event has `"finished": true` '
               'with `finish_reason` and `usage`, or is `{"error": {"code", "message"}, "finished": true}` '
               "when generation fails mid-stream.")


def _input(llm: GenerationService, fields: GenerationFields) -> GenerateInput:
    """Choose the model and merge the request's parameters over its defaults (raises 4xx/503 here)."""
    model_id = llm.select(fields.model)
    return GenerateInput(messages=fields.messages(), model=model_id,
                         params=llm.params_for(model_id, **fields.param_overrides()))


async def _stream(llm: GenerationService, fields: GenerationFields, drain_s: float):
    _, deltas = await llm.stream(_input(llm, fields))  # errors before the first token are still JSON answers
    serializer = V1StreamSerializer()
    return sse_response(deltas, on_delta=serializer.on_delta, on_error=serializer.on_error, end=serializer.end,
                        drain_s=drain_s)


@router.post("/generate", response_model=GenerateResponse,
             responses={**streamed_200("With `stream: true`: " + _STREAM_DOC), **_GEN_ERRORS})
async def generate(req: GenerateRequest, services: ServicesDep):
    """Reply to a prompt as one JSON answer with usage and latency (or, with stream=true, as SSE)."""
    if req.stream:
        return await _stream(services.llm, req, services.settings.server.graceful_timeout_s)
    out = await services.llm.generate(_input(services.llm, req))
    return GenerateResponse(text=out.text, usage=UsageBody.of(out.usage), latency=round(out.latency, 3),
                            model=out.model, finish_reason=out.finish_reason)


@router.post("/generate/stream", response_class=EventSourceResponse,
             responses={**streamed_200(_STREAM_DOC), **_GEN_ERRORS})
async def generate_stream(req: GenerationFields, services: ServicesDep):
    """Reply to a prompt as Server-Sent Events, one per token piece."""
    return await _stream(services.llm, req, services.settings.server.graceful_timeout_s)


@router.post("/batch/generate", response_model=BatchResponse, responses=error_responses(422))
async def batch_generate(req: BatchRequest, services: ServicesDep) -> BatchResponse:
    """Run up to 32 prompts concurrently (the engine batches them). An invalid item fails the whole request
    (422 naming it); an item that fails at run time (unknown model, overload, deadline) fails alone."""
    llm = services.llm

    async def one(item: GenerationFields) -> BatchResult | BatchError:
        try:
            out = await llm.generate(_input(llm, item))
        except ChatVLMError as exc:
            return BatchError(error=ErrorInfo.of(exc))
        except Exception:  # noqa: BLE001 - a bug in one item is logged and reported as such; the rest go on
            log.exception("batch item failed")
            return BatchError(error=ErrorInfo.of(ServerError("internal error during generation")))
        return BatchResult(text=out.text, usage=UsageBody.of(out.usage), finish_reason=out.finish_reason,
                           latency=round(out.latency, 3), model=out.model)

    results = await asyncio.gather(*(one(item) for item in req.requests))
    failed = sum(isinstance(r, BatchError) for r in results)
    return BatchResponse(results=list(results), total=len(results), successful=len(results) - failed, failed=failed)


@router.get("/models", response_model=ModelsResponse)
async def list_models(services: ServicesDep) -> ModelsResponse:
    """Every configured model: format, size on disk, whether it is installed and loaded, memory in use."""
    return ModelsResponse(models=[
        ModelItem(name=r.id, format=r.format, size=r.size, loaded=r.loaded, memory_usage=r.memory_usage,
                  display_name=r.name, kind=r.kind, tasks=r.tasks, installed=r.installed, status=r.status,
                  reason=r.reason)
        for r in model_rows(services)])


@router.post("/models/{name}/load", response_model=LoadResponse, responses=error_responses(400, 404, 422, 503))
async def load_model(name: str, services: ServicesDep,
                     body: Annotated[LoadRequest | None, Body()] = None) -> LoadResponse:
    """Load a model now (int8 / q8_0 quantization loads int8 weight-only); prefer_gpu falls back to the CPU."""
    body = body or LoadRequest()
    body.check()
    before = services.manager.state(name)  # 404 for unknown models
    was_loaded, adapter = before.status == "loaded", before.adapter
    state = await services.manager.ensure_loaded(name, quantization=body.engine_quantization)
    was_loaded = was_loaded and state.adapter is adapter  # False when it was reloaded at another quantization
    spec = state.entry.spec
    device = resolved_device(spec)
    return LoadResponse(status="loaded", model=name, device=device, load_time=round(state.load_seconds, 3),
                        memory_usage=human_bytes(state.memory_bytes), memory_bytes=state.memory_bytes,
                        already_loaded=was_loaded,
                        warning=body.device_warning(name, device, spec.device, gpu_info()[0]),
                        precision=getattr(getattr(state.adapter, "precision", None), "label", None))


@router.post("/models/{name}/unload", response_model=UnloadResponse, responses=error_responses(404, 422))
async def unload_model(name: str, services: ServicesDep) -> UnloadResponse:
    """Unload a model and free its memory; the next request that needs it loads it again."""
    return UnloadResponse(status="unloaded", model=name, was_loaded=await services.manager.unload(name))
