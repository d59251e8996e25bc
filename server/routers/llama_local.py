"""LLaMA-Local surface (seed 000): ``POST /generate`` (plain-text SSE by default) and ``GET /model-info``.
``GET /health`` is the vision core's (it carries ``model_loaded``)."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from llm.types import GenerateInput
from server.deps import ServicesDep
from server.model_listing import resolved_device
from server.schemas.llama_local import (STREAM_DOC, GenerateRequest, GenerateResponse, ModelInfoResponse, UsageBody,
                                        default_to_none, delta_events, end_events, error_events)
from server.schemas.vision import error_responses
from server.sse import sse_response

router = APIRouter(tags=["llama-local"])

@router.post("/generate", response_model=GenerateResponse,
             responses={**STREAM_DOC, **error_responses(400, 404, 422, 502, 503, 504)})
async def generate(req: GenerateRequest, services: ServicesDep):
    """Reply to a prompt, streamed as plain-text SSE pieces (default) or as one JSON answer."""
    llm = services.llm
    model_id = llm.select(req.model)
    inp = GenerateInput(messages=req.messages(), model=model_id,
                        params=llm.params_for(model_id, **req.param_overrides()))
    if req.stream:
        _, deltas = await llm.stream(inp)  # errors before the first token are still JSON answers
        return sse_response(deltas, on_delta=delta_events, on_error=error_events, end=end_events,
                            drain_s=services.settings.server.graceful_timeout_s)
    out = await llm.generate(inp)
    return GenerateResponse(text=out.text, prompt=req.prompt, usage=UsageBody.of(out.usage), model=out.model,
                            finish_reason=out.finish_reason)


@router.get("/model-info", response_model=ModelInfoResponse, responses=error_responses(404, 422, 503))
async def model_info(services: ServicesDep,
                     model: Annotated[str | None, Query(description="Model id (default: the configured text model)")]
                     = None) -> ModelInfoResponse:
    """The text model's context length, device and default sampling parameters; 503 when none is installed."""
    model_id = services.llm.select(default_to_none(model))
    spec = services.selector.entry(model_id).spec
    return ModelInfoResponse.of(services.llm.info(model_id), spec, resolved_device(spec))
