"""Per-model inference (seed 004): generate, chat/completions and embeddings on a model named in the
path, on the one engine and services every surface uses. Each request leaves a summary in the model's log."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter

from core.errors import ChatVLMError
from llm.types import GenerateInput, StreamDelta
from management.service import Management
from server.routers.management.common import CurrentUser, ManagementDep, error_responses
from server.routers.management.inference_schemas import (GenerateChunks, GenerateRequest, GenerateResponse,
                                                         StreamEvent, generate_response)
from server.schemas.openai_compat import ChatCompletionRequest
from server.schemas.openai_embeddings import EmbeddingRequest, EmbeddingResponse, embedding_response
from server.schemas.openai_responses import ChatChunks, ChatCompletion, chat_completion
from server.deps import ServicesDep
from server.schemas.sse_doc import json_data, marker, sse_response
from server.sse import sse_response as stream

router = APIRouter(tags=["management: inference"])

_ERRORS = error_responses(400, 404, 422, 502, 503, 504)
_GEN_STREAM = sse_response("With stream=true: `data: {\"id\",\"choices\":[{\"text\",\"index\"}]}` events, the last "
                           "with finish_reason and usage, then `data: [DONE]`.",
                           json_data(StreamEvent), marker("[DONE]", "End of the stream"),
                           example='data: {"id":"gen-1","choices":[{"text":"Hi","index":0}]}\n\ndata: [DONE]\n\n')


async def _observed(mgmt: Management, model: str, route: str, deltas: AsyncIterator[StreamDelta],
                    started: float) -> AsyncIterator[StreamDelta]:
    """Pass a stream through, and log its summary when it ends (however it ends)."""
    status, tokens = 200, None
    try:
        async for delta in deltas:
            if delta.usage is not None:
                tokens = delta.usage.total_tokens
            yield delta
    except ChatVLMError as exc:
        status = exc.status_code
        raise
    finally:
        await deltas.aclose()
        mgmt.request_summary(model, route + " (stream)", status, tokens, time.monotonic() - started)


async def _run(services, mgmt: Management, model: str, route: str, inp: GenerateInput, stream_: bool, on_stream,
               on_json):
    started = time.monotonic()
    try:
        if stream_:
            model_id, deltas = await services.llm.stream(inp)
            return on_stream(model_id, _observed(mgmt, model, route, deltas, started))
        out = await services.llm.generate(inp)
    except ChatVLMError as exc:
        mgmt.request_summary(model, route, exc.status_code, None, time.monotonic() - started)
        raise
    mgmt.request_summary(model, route, 200, out.usage.total_tokens, time.monotonic() - started)
    return on_json(out)


@router.post("/models/{model_id}/generate", response_model=GenerateResponse, responses={**_GEN_STREAM, **_ERRORS})
async def generate(model_id: str, req: GenerateRequest, _: CurrentUser, mgmt: ManagementDep, services: ServicesDep):
    """Continue a prompt with this model (raw text, no chat template); stream=true answers SSE."""
    name = mgmt.catalog.get(model_id).id
    llm = services.llm
    llm.select(name)  # 404 when the model cannot generate text
    inp = GenerateInput(prompt=req.prompt, model=name, params=llm.params_for(name, **req.overrides()))
    drain = services.settings.server.graceful_timeout_s

    def on_stream(_, deltas):
        chunks = GenerateChunks()
        return stream(deltas, on_delta=chunks.on_delta, on_error=chunks.on_error, end=chunks.end, drain_s=drain)

    return await _run(services, mgmt, name, "generate", inp, req.stream, on_stream, generate_response)


@router.post("/models/{model_id}/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
async def chat_completions(model_id: str, req: ChatCompletionRequest, _: CurrentUser,
                           mgmt: ManagementDep, services: ServicesDep):
    """Chat with this model, OpenAI-style (images as image_url content parts with data: URLs)."""
    name = mgmt.catalog.get(model_id).id
    req.model = name  # the path names the model; a body `model` is ignored
    inp = req.to_generate_input(services.llm, max_image_bytes=services.settings.limits.max_file_bytes)
    drain = services.settings.server.graceful_timeout_s

    def on_stream(model, deltas):
        chunks = ChatChunks(model, include_usage=req.include_usage)
        return stream(deltas, on_delta=chunks.on_delta, on_error=chunks.on_error, end=chunks.end, drain_s=drain)

    return await _run(services, mgmt, name, "chat/completions", inp, req.stream, on_stream, chat_completion)


@router.post("/models/{model_id}/embeddings", response_model=EmbeddingResponse, responses=_ERRORS)
async def embeddings(model_id: str, req: EmbeddingRequest, _: CurrentUser, mgmt: ManagementDep,
                     services: ServicesDep):
    """Sentence embeddings from this model (an embedding model), as /v1/embeddings computes them."""
    name = mgmt.catalog.get(model_id).id
    started = time.monotonic()
    try:
        result = await services.embeddings.embed(name, req.inputs(), dimensions=req.dimensions)
    except ChatVLMError as exc:
        mgmt.request_summary(name, "embeddings", exc.status_code, None, time.monotonic() - started)
        raise
    mgmt.request_summary(name, "embeddings", 200, result.prompt_tokens, time.monotonic() - started)
    return embedding_response(result, req.encoding_format)
