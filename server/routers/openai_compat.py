"""OpenAI-compatible surface (/v1): chat completions, raw completions and the model list,
as the official ``openai`` SDK expects them. Errors come out in OpenAI's shape (server/errors.py)."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from core.errors import BadRequest, NotFound
from core.types import Capability
from models.registry import RegistryEntry, not_installed_message
from server.deps import Services, ServicesDep
from server.schemas.openai_compat import ChatCompletionRequest, CompletionRequest
from server.schemas.openai_embeddings import EmbeddingRequest, EmbeddingResponse, embedding_response
from server.schemas.openai_responses import (ChatChunks, ChatCompletion, ChatCompletionChunk, Completion,
                                             CompletionChunk, CompletionChunks, OpenAIModel, OpenAIModelList,
                                             chat_completion, completion, error_responses, stream_response_doc)
from server.sse import sse_response

router = APIRouter(prefix="/v1", tags=["openai"])

_GENERATE_ERRORS = error_responses(400, 404, 413, 415, 502, 503, 504)
_CHAT_EXAMPLE = ('data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"qwen2_5_0_5b",'
                 '"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\ndata: [DONE]\n\n')
_COMPLETION_EXAMPLE = ('data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"qwen2_5_0_5b",'
                       '"choices":[{"index":0,"text":"Hi","finish_reason":null}]}\n\ndata: [DONE]\n\n')
_TEXT_CAPABILITIES = {Capability.GENERATE, Capability.CHAT, Capability.EMBED}


@router.post("/chat/completions", response_model=ChatCompletion, responses={
    **stream_response_doc(ChatCompletionChunk, _CHAT_EXAMPLE), **_GENERATE_ERRORS})
async def chat_completions(req: ChatCompletionRequest, services: ServicesDep):
    """Chat with a text or vision-language model; images come as data: URLs in image_url parts
    (or https URLs, when the server enables them)."""
    fetched = await _fetch_images(req, services)
    inp = req.to_generate_input(services.llm, max_image_bytes=services.settings.limits.max_file_bytes,
                                fetched=fetched)
    if req.stream:
        model_id, deltas = await services.llm.stream(inp)
        chunks = ChatChunks(model_id, include_usage=req.include_usage)
        return sse_response(deltas, on_delta=chunks.on_delta, on_error=chunks.on_error, end=chunks.end,
                            drain_s=services.settings.server.graceful_timeout_s)
    return chat_completion(await services.llm.generate(inp))


async def _fetch_images(req: ChatCompletionRequest, services: Services) -> dict[str, bytes]:
    """The bytes of the request's http(s) image URLs, fetched concurrently; none when image URLs
    are off (the conversion then refuses them with 400 IMAGE_URL_NOT_ALLOWED)."""
    fetcher = services.image_fetcher
    urls = req.remote_image_urls() if fetcher.enabled else []
    if not urls:
        return {}
    limit = services.settings.limits.max_batch_files
    if len(urls) > limit:
        raise BadRequest(f"at most {limit} image URLs are fetched per request", param="messages",
                         code="TOO_MANY_IMAGE_URLS")
    # Every check that needs no image runs first (unsupported parameters, roles, the model), so a
    # request that would be refused anyway costs no fetch.
    req.to_generate_input(services.llm, max_image_bytes=services.settings.limits.max_file_bytes,
                          fetched={url: b"" for _, url in urls})
    return await fetcher.fetch_all(urls)


@router.post("/completions", response_model=Completion, responses={
    **stream_response_doc(CompletionChunk, _COMPLETION_EXAMPLE), **_GENERATE_ERRORS})
async def completions(req: CompletionRequest, services: ServicesDep):
    """Continue a raw prompt (no chat template)."""
    inp = req.to_generate_input(services.llm)
    if req.stream:
        model_id, deltas = await services.llm.stream(inp)
        chunks = CompletionChunks(model_id, include_usage=req.include_usage)
        return sse_response(deltas, on_delta=chunks.on_delta, on_error=chunks.on_error, end=chunks.end,
                            drain_s=services.settings.server.graceful_timeout_s)
    return completion(await services.llm.generate(inp))


@router.post("/embeddings", response_model=EmbeddingResponse, responses=error_responses(400, 404, 503, 504))
async def embeddings(req: EmbeddingRequest, services: ServicesDep):
    """Sentence embeddings; concurrent requests share forward passes."""
    result = await services.embeddings.embed(req.model, req.inputs(), dimensions=req.dimensions)
    return embedding_response(result, req.encoding_format)


@router.get("/models", response_model=OpenAIModelList)
async def list_models(services: ServicesDep) -> OpenAIModelList:
    """The installed models that generate text (text LLMs and VLMs) or embeddings."""
    entries = [e for e in services.registry.entries() if e.capabilities & _TEXT_CAPABILITIES]
    return OpenAIModelList(data=[_card(e) for e in entries if e.install_state().installed])


@router.get("/models/{model_id:path}", response_model=OpenAIModel, responses=error_responses(404))
async def get_model(services: ServicesDep,
                    model_id: Annotated[str, Path(description="A model id from /v1/models")]) -> OpenAIModel:
    """One model of /v1/models."""
    entry = services.registry.get(model_id)
    if entry is None or not entry.capabilities & _TEXT_CAPABILITIES:
        raise NotFound(f"The model '{model_id}' does not exist", param="model", code="MODEL_NOT_FOUND")
    state = entry.install_state()
    if not state.installed:
        raise NotFound(not_installed_message(entry, state.reason), param="model", code="MODEL_NOT_INSTALLED")
    return _card(entry)


def _card(entry: RegistryEntry) -> OpenAIModel:
    path = entry.spec.path
    try:
        created = int(path.stat().st_mtime) if path is not None else 0
    except OSError:
        created = 0
    return OpenAIModel(id=entry.id, created=created)
