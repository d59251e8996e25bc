"""EasyVizAI local LLM surface (seed 001): health, text models, generation (JSON and SSE),
and the WebSocket chat with per-session history.

Every path is served with and without its trailing slash: the seed's clients use the slash,
and a client that drops it must not get a 307 that many HTTP clients turn into a failed POST.

WebSocket ``/ws/chat/{session_id}/`` (frames in server/schemas/easyviz.py): on connect the server
sends ``connection_established``. A ``chat_message`` is answered with ``assistant_chunk`` frames and
always one ``assistant_end`` (full text, finish_reason, usage); a failure after the answer started
is an ``error`` frame right before that ``assistant_end`` (finish_reason "error"). Input that
cannot start an answer (bad JSON, unknown type, empty message, unknown model, a second message
while one is streaming: code BUSY) gets only an ``error`` frame, and the socket stays open.
``model_switch`` → ``model_switched``; ``cancel`` stops the answer (finish_reason "cancelled");
``ping`` → ``pong``. Finished exchanges join the session's history (server/chat_sessions.py);
cancelled or failed ones do not. Closing the socket cancels the generation in the engine.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, WebSocket
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.requests import HTTPConnection

from core.errors import BadRequest, CapabilityMissing, ChatVLMError, InvalidParameter, ServerError
from core.system import gpu_info, human_bytes
from core.types import Capability
from llm.types import ChatMessage, GenerateInput, StreamDelta, Usage
from models.registry import RegistryEntry
from server.chat_sessions import SESSION_ID, ChatSessionStore
from server.deps import Services, ServicesDep
from server.errors import Surface, error_body
from server.schemas.easyviz import (MAX_CHAT_MESSAGE_CHARS, SEED_MAX_LENGTH, SEED_TEMPERATURE, SEED_TOP_P,
                                    ChatMessageFrame, GenerationParameters,
                                    LlmGenerateRequest, LlmGenerateResponse, LlmHealthResponse,
                                    LlmModelActionResponse, LlmModelConfig, LlmModelDetailResponse,
                                    LlmModelsResponse, LlmModelSummary, LlmUsage, ModelSwitchFrame, STREAM_DOC,
                                    error_responses)
from server.sse import sse_response

log = logging.getLogger("chatvlm.easyviz")

router = APIRouter(tags=["easyviz"])


def _route(method: str, path: str, **kwargs: Any):
    """Register ``path`` (documented) and its slash-less twin (hidden), so neither redirects."""
    def register(endpoint):
        router.add_api_route(path, endpoint, methods=[method], **kwargs)
        router.add_api_route(path.rstrip("/"), endpoint, methods=[method], include_in_schema=False, **kwargs)
        return endpoint
    return register


async def _sessions(conn: HTTPConnection) -> ChatSessionStore:
    """The app's chat session store, created on first use (nothing is built at import)."""
    store = getattr(conn.app.state, "easyviz_sessions", None)
    if store is None:
        store = conn.app.state.easyviz_sessions = ChatSessionStore()
    return store


SessionsDep = Annotated[ChatSessionStore, Depends(_sessions)]


# ---- health and models ----------------------------------------------------------------------
def _device() -> str:
    return "cuda" if gpu_info()[0] else "cpu"


def _text_entries(services: Services) -> list[RegistryEntry]:
    return [e for e in services.registry.entries() if Capability.GENERATE in e.capabilities]


def _loaded_text_models(services: Services) -> list[str]:
    text = {e.id for e in _text_entries(services)}
    return [m for m in services.manager.loaded_ids() if m in text]


def _current_model(services: Services) -> str | None:
    try:
        return services.llm.select(None)
    except ChatVLMError:
        return None


def _text_entry(services: Services, model_key: str) -> RegistryEntry:
    entry = services.selector.entry(model_key)  # ModelNotFound (404) when unknown
    if Capability.GENERATE not in entry.capabilities:
        raise CapabilityMissing(f"Model '{model_key}' is not a text generation model", param="model")
    return entry


def _reason(services: Services, entry: RegistryEntry) -> tuple[bool, str, str | None]:
    state = services.manager.state(entry.id)
    install = entry.install_state()
    reason = state.error if state.status == "failed" else (None if install.installed else install.reason)
    return install.installed, state.status, reason


@_route("GET", "/api/v1/llm/health/", response_model=LlmHealthResponse)
async def health(services: ServicesDep, sessions: SessionsDep) -> LlmHealthResponse:
    """LLM service status, the loaded text models and the model a request without `model` gets."""
    preload_failed = any(m in services.manager.failed_ids() for m in services.settings.manager.preload)
    return LlmHealthResponse(status="degraded" if preload_failed else "healthy", device=_device(),
                          loaded_models=_loaded_text_models(services), current_model=_current_model(services),
                          active_sessions=len(sessions), websocket_connections=sessions.connections)


@_route("GET", "/api/v1/llm/models/", response_model=LlmModelsResponse)
async def list_models(services: ServicesDep) -> LlmModelsResponse:
    """Every configured text model; `available_models` holds those that can serve now."""
    summaries = []
    for entry in _text_entries(services):
        installed, status, reason = _reason(services, entry)
        summaries.append(LlmModelSummary(key=entry.id, name=entry.spec.name, type=entry.spec.kind, installed=installed,
                                      loaded=status == "loaded", status=status, reason=reason))
    return LlmModelsResponse(current_model=_current_model(services), loaded_models=_loaded_text_models(services),
                          device=_device(), available_models=[s.key for s in summaries if s.installed],
                          models=summaries)


ModelKey = Annotated[str, Path(description="A model key from /api/v1/llm/models/, or an alias such as 'qwen'",
                               max_length=256, examples=["qwen"])]


@_route("GET", "/api/v1/llm/models/{model_key}/", response_model=LlmModelDetailResponse,
        responses=error_responses(400, 404, 422))
async def model_detail(model_key: ModelKey, services: ServicesDep) -> LlmModelDetailResponse:
    """One text model: whether it is loaded and its configuration."""
    entry = _text_entry(services, model_key)
    installed, status, reason = _reason(services, entry)
    info = services.llm.info(model_key)
    spec, gen = entry.spec, info.defaults
    config = LlmModelConfig(name=spec.hf_repo or spec.name, display_name=spec.name,
                             model_path=spec.path.as_posix() if spec.path else None, type=spec.kind,
                             # this surface's defaults: the seed's for these three, the model's for the rest
                             device=spec.device, max_length=SEED_MAX_LENGTH, temperature=SEED_TEMPERATURE,
                             top_p=SEED_TOP_P, top_k=gen.top_k, repetition_penalty=gen.repetition_penalty,
                             context_length=info.context_length)
    engine = services.manager.state(model_key).engine if info.loaded else None
    return LlmModelDetailResponse(name=model_key, loaded=info.loaded, installed=installed, status=status,
                                  reason=reason, config=config,
                                  active_requests=engine.active_count if engine else None,
                                  queued_requests=engine.waiting_count if engine else None)


@_route("POST", "/api/v1/llm/models/{model_key}/load/", response_model=LlmModelActionResponse,
        responses=error_responses(400, 404, 422, 503))
async def load_model(model_key: ModelKey, services: ServicesDep) -> LlmModelActionResponse:
    """Load a text model now instead of on its first request."""
    _text_entry(services, model_key)
    state = await services.manager.ensure_loaded(model_key)
    return LlmModelActionResponse(message=f"Model {model_key} loaded successfully",
                               load_time=round(state.load_seconds, 3), memory_usage=human_bytes(state.memory_bytes))


@_route("POST", "/api/v1/llm/models/{model_key}/unload/", response_model=LlmModelActionResponse,
        responses=error_responses(400, 404, 422))
async def unload_model(model_key: ModelKey, services: ServicesDep) -> LlmModelActionResponse:
    """Unload a text model and free its memory; the next request that needs it loads it again."""
    _text_entry(services, model_key)
    was_loaded = await services.manager.unload(model_key)
    return LlmModelActionResponse(message=f"Model {model_key} unloaded successfully" if was_loaded
                                  else f"Model {model_key} was not loaded")


# ---- generation -----------------------------------------------------------------------------
def _input(services: Services, history: list[ChatMessage], prompt: str, model: str | None,
           parameters: GenerationParameters) -> GenerateInput:
    """A chat-template request: the history, then the prompt as the user's turn."""
    model_id = services.llm.select(model)
    params = parameters.apply(services.llm.params_for(model_id))
    return GenerateInput(messages=[*history, ChatMessage("user", prompt)], model=model_id, params=params)


def _usage(usage: Usage | None) -> LlmUsage | None:
    if usage is None:
        return None
    return LlmUsage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                    total_tokens=usage.total_tokens)


def _error_data(exc: ChatVLMError) -> dict[str, Any]:
    return error_body(Surface.EASYVIZ, exc.status_code, exc.code, exc.message)


_GENERATE_ERRORS = error_responses(400, 404, 413, 422, 502, 503, 504)


@_route("POST", "/api/v1/llm/generate/", response_model=LlmGenerateResponse, responses=_GENERATE_ERRORS)
async def generate(body: LlmGenerateRequest, services: ServicesDep) -> LlmGenerateResponse:
    """Generate a reply to the prompt, all at once."""
    out = await services.llm.generate(_input(services, [], body.prompt, body.model, body.parameters))
    return LlmGenerateResponse(response=out.text, model=out.model, prompt=body.prompt,
                               finish_reason=out.finish_reason, usage=_usage(out.usage),
                               processing_time=round(out.latency, 3))


@_route("POST", "/api/v1/llm/generate/stream/", response_class=EventSourceResponse,
        responses={**STREAM_DOC, **_GENERATE_ERRORS})
async def generate_stream(body: LlmGenerateRequest, services: ServicesDep) -> EventSourceResponse:
    """Generate a reply to the prompt as server-sent events."""
    _, deltas = await services.llm.stream(_input(services, [], body.prompt, body.model, body.parameters))
    return sse_response(deltas, on_delta=lambda d: [{"chunk": d.text}] if d.text else [],
                        on_error=lambda exc: [_error_data(exc)], end=lambda: [{"done": True}],
                        drain_s=services.settings.server.graceful_timeout_s)


# ---- WebSocket chat ---------------------------------------------------------------------------
class _Gone(Exception):
    """The client closed the socket while we were sending."""


@dataclass
class _Answer:
    user: str
    model: str
    stream: bool
    parts: list[str] = field(default_factory=list)
    finish: str | None = None
    usage: LlmUsage | None = None

    def end_frame(self, finish: str, usage: LlmUsage | None = None) -> dict[str, Any]:
        return {"type": "assistant_end", "model": self.model, "message": "".join(self.parts),
                "finish_reason": finish, "usage": usage.model_dump() if usage else None}


def _parse(text: str | None) -> ChatMessageFrame | ModelSwitchFrame | dict:
    """A client frame, checked; raises the error to send back as an error frame."""
    if text is None:
        raise BadRequest("frames must be JSON text, not binary", code="INVALID_FRAME")
    try:
        data = json.loads(text)
    except ValueError:
        raise BadRequest("frame is not valid JSON", code="INVALID_JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("a frame must be a JSON object", code="INVALID_FRAME")
    kind = data.get("type")
    kind = kind if isinstance(kind, str) else None
    if kind in ("ping", "cancel"):
        return data
    schema = {"chat_message": ChatMessageFrame, "model_switch": ModelSwitchFrame}.get(kind)
    if schema is None:
        shown = "no type" if kind is None else f"unknown message type '{kind[:40]}'"
        raise BadRequest(f"{shown}; expected chat_message, model_switch, cancel or ping",
                         param="type", code="UNKNOWN_TYPE")
    try:
        frame = schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or None
        raise InvalidParameter(f"{param}: {err.get('msg', 'invalid value')}" if param else "invalid frame",
                               param=param, code="VALIDATION_ERROR") from None
    if isinstance(frame, ChatMessageFrame):
        if not frame.message.strip():
            raise BadRequest("message must not be empty", param="message", code="EMPTY_MESSAGE")
        if len(frame.message) > MAX_CHAT_MESSAGE_CHARS:
            raise BadRequest(f"message is longer than {MAX_CHAT_MESSAGE_CHARS} characters", param="message",
                             code="MESSAGE_TOO_LONG")
    return frame


class _ChatConnection:
    """One open chat socket: reads frames while at most one answer streams in its own task."""

    def __init__(self, ws: WebSocket, services: Services, store: ChatSessionStore, session_id: str) -> None:
        self.ws, self.services, self.store, self.session_id = ws, services, store, session_id
        self._send_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._answer: _Answer | None = None

    async def send(self, frame: dict[str, Any]) -> None:
        text = json.dumps(frame, ensure_ascii=False)
        async with self._send_lock:
            try:
                await self.ws.send_text(text)
            except Exception as exc:  # noqa: BLE001 - any failure to write means the client is gone
                raise _Gone() from exc

    async def send_error(self, exc: ChatVLMError) -> None:
        await self.send({"type": "error", **_error_data(exc)})

    async def run(self) -> None:
        session = self.store.get(self.session_id)
        await self.send({"type": "connection_established", "session_id": self.session_id, "model": session.model,
                         "history_turns": len(session.exchanges)})
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                await self.handle(_parse(message.get("text")))
            except ChatVLMError as exc:
                await self.send_error(exc)

    async def handle(self, frame: ChatMessageFrame | ModelSwitchFrame | dict) -> None:
        if isinstance(frame, ChatMessageFrame):
            self.start_answer(frame)
        elif isinstance(frame, ModelSwitchFrame):
            model_id = self.services.llm.select(frame.model)
            self.store.set_model(self.session_id, model_id)
            await self.send({"type": "model_switched", "model": model_id})
        elif frame["type"] == "ping":
            await self.send({"type": "pong", "timestamp": frame.get("timestamp")})
        else:
            await self.cancel_answer()

    def start_answer(self, frame: ChatMessageFrame) -> None:
        if self._task is not None and not self._task.done():
            raise BadRequest("an answer is still streaming: wait for assistant_end, or send cancel",
                             code="BUSY")
        session = self.store.get(self.session_id)
        inp = _input(self.services, session.history(), frame.message, frame.model or session.model,
                     frame.parameters)
        self._answer = answer = _Answer(user=frame.message, model=inp.model, stream=frame.stream)
        self._task = asyncio.create_task(self._generate(inp, answer))

    async def _generate(self, inp: GenerateInput, answer: _Answer) -> None:
        try:
            try:
                answer.model, deltas = await self.services.llm.stream(inp)
                try:
                    async for delta in deltas:
                        await self._on_delta(answer, delta)
                finally:
                    await deltas.aclose()  # stops the engine work when we leave early
            except ChatVLMError as exc:
                await self.send_error(exc)
                await self.send(answer.end_frame("error"))
                return
            except _Gone:
                raise
            except Exception:  # noqa: BLE001 - a bug: say so without details, keep the socket
                log.exception("chat generation failed in session %s", self.session_id)
                await self.send_error(ServerError("internal error during generation"))
                await self.send(answer.end_frame("error"))
                return
            self.store.record(self.session_id, answer.user, "".join(answer.parts))
            await self.send(answer.end_frame(answer.finish or "stop", answer.usage))
        except _Gone:
            pass

    async def _on_delta(self, answer: _Answer, delta: StreamDelta) -> None:
        if delta.text:
            answer.parts.append(delta.text)
            if answer.stream:
                await self.send({"type": "assistant_chunk", "chunk": delta.text, "model": answer.model})
        if delta.finish_reason:
            answer.finish, answer.usage = delta.finish_reason, _usage(delta.usage)

    async def cancel_answer(self) -> None:
        """Stop the answer in progress (a no-op when none is); it ends with finish_reason "cancelled"."""
        task, answer = self._task, self._answer
        if task is None or task.done() or answer is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if task.cancelled():
            await self.send(answer.end_frame("cancelled"))

    async def close(self) -> None:
        """The client left: cancel the answer in progress, which cancels its engine work."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])


async def _chat_socket(websocket: WebSocket, session_id: str, services: ServicesDep, store: SessionsDep) -> None:
    """EasyVizAI chat: `chat_message` → `assistant_chunk` frames, then `assistant_end`; errors as frames."""
    await websocket.accept()
    if not SESSION_ID.fullmatch(session_id):
        await websocket.send_json({"type": "error", **error_body(
            Surface.EASYVIZ, 400, "INVALID_SESSION_ID", "session id must be 1-128 letters, digits or _.:-")})
        await websocket.close(code=1008)
        return
    conn = _ChatConnection(websocket, services, store, session_id)
    store.connections += 1
    try:
        await conn.run()
    except _Gone:
        pass
    finally:
        store.connections -= 1
        await conn.close()


router.add_api_websocket_route("/ws/chat/{session_id}/", _chat_socket)
router.add_api_websocket_route("/ws/chat/{session_id}", _chat_socket)
