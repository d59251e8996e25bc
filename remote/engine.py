"""The engine of a remote model: the same face as the local generation engine (encode, submit,
a handle that streams StreamDelta), with an OpenAI-protocol server doing the work.

Requests pass a concurrency bound (``max_concurrency``), then wait in the model's queue
(``max_queue``), then get 503. Each one goes to a healthy URL, least loaded first; a URL that
cannot be reached is skipped before any byte is sent. Tokens pass straight through as the remote
streams them. Leaving the handle closes the upstream connection, which stops the remote's work.

Generation requests go through aiohttp (its C HTTP parser and its connection pool cost a fraction
of httpx's per request and per streamed chunk: see docs/BENCHMARKS.md, remote engine, run 7); the
health probes, a few requests a second, stay on httpx.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx

from core.config import RemoteEngineConfig
from core.errors import (BackendUnavailable, BadGateway, BadRequest, ChatVLMError, GatewayTimeout, ModelUnavailable,
                         Overloaded, RemoteRejected)
from core.types import CancelToken, GenerationParams
from llm.types import StreamDelta, Usage
from remote import wire
from remote.pool import Backend, BackendPool

log = logging.getLogger("chatvlm.remote")

RETRY_AFTER = {"Retry-After": "1"}
KEEPALIVE_S = 4.0
# A remote's 401/403 means our api_key for it is wrong: the client did nothing wrong.
_CREDENTIAL_STATUSES = (401, 403, 407)


class RemoteEngine:
    def __init__(self, cfg: RemoteEngineConfig, *, name: str, framework: str, remote_model: str,
                 max_queue: int, metrics: Any = None) -> None:
        self.cfg = cfg
        self.name = name
        self.framework = framework
        self.remote_model = remote_model
        self.max_queue = max_queue
        self.metrics = metrics
        self.context_length = None  # the remote's business; it refuses a prompt that is too long
        self._headers = {"Authorization": f"Bearer {cfg.api_key.get_secret_value()}"} if cfg.api_key else {}
        self._post_headers = {**self._headers, "Content-Type": "application/json"}
        self._running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.client: httpx.AsyncClient | None = None       # the health probes
        self.session: aiohttp.ClientSession | None = None  # the generation requests
        self.pool: BackendPool | None = None

    # ---- lifecycle (the manager's) ---------------------------------------------------------
    def start(self) -> None:
        """Open the shared connection pool and start the health probes (on the event loop)."""
        self._loop = asyncio.get_running_loop()
        # httpx logs every request at INFO: the health probes alone would flood the server's log.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        timeout = httpx.Timeout(self.cfg.timeout_s, connect=self.cfg.connect_timeout_s)
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency + 2 * len(self.cfg.base_url),
                              max_keepalive_connections=self.cfg.max_concurrency)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False, trust_env=False)
        # Idle connections are dropped before servers drop them (uvicorn, under vLLM, SGLang and
        # transformers serve, closes them after 5 s): a request on one the server just closed fails.
        connector = aiohttp.TCPConnector(limit=self.cfg.max_concurrency + 2 * len(self.cfg.base_url), limit_per_host=0,
                                         keepalive_timeout=KEEPALIVE_S)
        self.session = aiohttp.ClientSession(
            connector=connector, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s, sock_read=self.cfg.timeout_s))
        self.pool = BackendPool(self.cfg.base_url, self.client, headers=self._headers,
                                interval_s=self.cfg.health_interval_s, failure_threshold=self.cfg.failure_threshold,
                                open_s=self.cfg.open_s, name=self.name)
        self.pool.start()

    async def ready(self) -> None:
        """The first round of probes, so the first request knows which URLs answer."""
        await self.pool.probe_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop probing, fail what waits, close the connections (called off the event loop)."""
        self._stopping = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout)
        except Exception:  # noqa: BLE001 - the loop is going away: nothing is left to close on it
            log.debug("remote %s: closing after the event loop stopped", self.name)

    async def _close(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ModelUnavailable(f"model '{self.name}' was unloaded", headers=RETRY_AFTER))
        await self.pool.stop()
        await self.client.aclose()
        await self.session.close()

    # ---- what the generation service calls -------------------------------------------------
    @property
    def active_count(self) -> int:
        return self._running

    @property
    def waiting_count(self) -> int:
        return len(self._waiters)

    def urls(self) -> list[Backend]:
        return list(self.pool.backends) if self.pool else []

    def encode(self, messages, prompt: str | None) -> wire.RemotePrompt:
        """The remote's request body (images as data: URLs); CPU work, called off the event loop."""
        return wire.encode(messages, prompt)

    def submit(self, prompt: wire.RemotePrompt, params: GenerationParams, cancel: CancelToken) -> RemoteHandle:
        """Admit a request (on the event loop): a slot, a place in the queue, or 503 at once."""
        if not prompt.prompt_text and prompt.path == "/v1/completions":
            raise BadRequest("the prompt is empty", param="prompt", code="EMPTY_PROMPT")
        if self._stopping:
            raise ModelUnavailable(f"model '{self.name}' is being unloaded", headers=RETRY_AFTER)
        if not self.pool.available():
            raise BackendUnavailable(f"no backend of model '{self.name}' is healthy right now; retry shortly",
                                     headers=RETRY_AFTER)
        waiter = None
        if self._running < self.cfg.max_concurrency:
            self._running += 1
        elif len(self._waiters) < self.max_queue:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        else:
            raise Overloaded(f"model '{self.name}' has {len(self._waiters)} requests waiting; retry shortly",
                             headers=RETRY_AFTER)
        self._report()
        body = {**prompt.body, **wire.sampling(params, self.framework), "model": self.remote_model, "stream": True}
        body["stream_options"] = {"include_usage": True}  # usage in the last chunk (else we count)
        return RemoteHandle(self, prompt, body, params, cancel, waiter)

    # ---- slots -------------------------------------------------------------------------------
    def _release_slot(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the next one waiting
                self._report()
                return
        self._running -= 1
        self._report()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.name, len(self._waiters))
            self.metrics.set_batch_size(self.name, self._running)


class RemoteHandle:
    """One request to the remote: ``ready()`` opens it (errors before the first token raise there,
    as HTTP statuses), then iterating yields the deltas as the remote streams them."""

    def __init__(self, engine: RemoteEngine, prompt: wire.RemotePrompt, body: dict, params: GenerationParams,
                 cancel: CancelToken, waiter: asyncio.Future | None) -> None:
        self.engine = engine
        self.prompt = prompt
        self.body = body
        self.params = params
        self.cancel = cancel
        self._waiter = waiter
        self._has_slot = waiter is None
        self._response: aiohttp.ClientResponse | None = None
        self._backend: Backend | None = None
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.submitted = time.monotonic()
        self._first_at: float | None = None

    def _remaining(self) -> float | None:
        return None if self.cancel.deadline is None else max(0.0, self.cancel.deadline - time.monotonic())

    async def ready(self) -> None:
        """Wait for a slot, then send the request to a healthy URL and read the remote's status."""
        try:
            async with asyncio.timeout(self._remaining()):
                if self._waiter is not None:
                    await self._waiter
                    self._has_slot = True
                await self._open()
        except TimeoutError:
            self._finish_request(None)
            raise GatewayTimeout(f"model '{self.engine.name}': no answer from the remote engine within the "
                                 "request's deadline") from None
        except BaseException:
            self._finish_request(None)
            raise

    async def _open(self) -> None:
        engine, pool = self.engine, self.engine.pool
        tried: set[str] = set()
        stale_retry = True
        while True:
            backend = pool.acquire(tried)
            if backend is None:
                raise BackendUnavailable(f"no backend of model '{engine.name}' is healthy right now; retry shortly",
                                         headers=RETRY_AFTER)
            tried.add(backend.url)
            self._backend = backend
            try:
                response = await engine.session.post(backend.url + self.prompt.path, data=self._payload(),
                                                     headers=engine._post_headers, allow_redirects=False)
            except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError):
                self._drop_backend(backend, down=True)  # never reached it: another URL may take it
                continue
            except aiohttp.ServerTimeoutError:
                self._drop_backend(backend, ok=False)
                raise GatewayTimeout(f"model '{engine.name}': the remote engine did not answer within "
                                     f"{engine.cfg.timeout_s:g} s") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) if stale_retry else ():
                # Likely a kept-alive connection the server had just closed: once, the same URL
                # again, without counting it against the URL.
                stale_retry = False
                self._drop_backend(backend, ok=None)
                tried.discard(backend.url)
                continue
            except aiohttp.ClientError:
                self._drop_backend(backend, ok=False)  # the connection broke before any answer
                continue
            if response.status < 400:
                self._response = response
                return
            raw = await _read_capped(response)
            status = response.status
            message = wire.error_from_body(raw)
            if status >= 500 or status in _CREDENTIAL_STATUSES:
                self._drop_backend(backend, ok=False if status >= 500 else None)
                if status in (502, 503, 504) and pool.available(tried):
                    continue  # that URL cannot take it now; another may
                if status in _CREDENTIAL_STATUSES:
                    raise BadGateway(f"model '{engine.name}': the remote engine refused our credentials "
                                     "(check the model's api_key)")
                raise BadGateway(f"model '{engine.name}': the remote engine failed ({status})"
                                 + (f": {message}" if message else ""))
            self._drop_backend(backend, ok=None)
            headers = {"Retry-After": response.headers["retry-after"]} if "retry-after" in response.headers else None
            raise RemoteRejected(status, message or f"the remote engine refused the request ({status})",
                                 code=_CODES.get(status, "REMOTE_REJECTED"), headers=headers)

    def _payload(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode()

    def _drop_backend(self, backend: Backend, ok: bool | None = None, down: bool = False) -> None:
        self.engine.pool.release(backend, None if down else ok)
        if down:
            self.engine.pool.mark_down(backend)
        self._backend = None

    def _finish_request(self, ok: bool | None) -> None:
        """Give back the URL and the slot (once), whatever happened."""
        if self._backend is not None:
            self.engine.pool.release(self._backend, ok)
            self._backend = None
        if self._waiter is not None and not self._has_slot:
            if self._waiter.done() and not self._waiter.cancelled() and self._waiter.exception() is None:
                self._has_slot = True  # granted just as we left: pass it on
            else:
                self._waiter.cancel()
                try:
                    self.engine._waiters.remove(self._waiter)
                except ValueError:
                    pass
                self.engine._report()
            self._waiter = None
        if self._has_slot:
            self._has_slot = False
            self.engine._release_slot()

    # ---- streaming ----------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamDelta]:
        # The body is read as it arrives and split into lines here: every event of one read is
        # parsed before any is yielded, so all but the last go out with ``more`` (one write for all
        # of them downstream).
        engine = self.engine
        chunks, text, usage, finish, ok = 0, "", None, None, None
        reads = self._response.content.iter_any()
        buffer, done, failure = b"", False, None
        looping = self.params.max_repeat
        try:
            while not done:
                if self.cancel.cancelled:
                    self.finish_reason = "cancelled"
                    return
                try:
                    remaining = self._remaining()
                    if remaining is None or remaining > engine.cfg.timeout_s:
                        data = await anext(reads)  # the read timeout (timeout_s) comes first anyway
                    else:
                        async with asyncio.timeout(remaining):  # around the read only, never a yield
                            data = await anext(reads)
                except StopAsyncIteration:
                    if finish is None:
                        ok = False
                        raise BadGateway(f"model '{engine.name}': the remote engine's stream ended early") from None
                    break
                except aiohttp.ServerTimeoutError:  # the remote's silence (timeout_s), before the deadline below
                    ok = False
                    raise GatewayTimeout(f"model '{engine.name}': the remote engine stopped streaming for "
                                         f"{engine.cfg.timeout_s:g} s") from None
                except TimeoutError:  # the request's own deadline (the service says 504)
                    self.finish_reason = "cancelled"
                    self.cancel.cancel()
                    return
                *lines, buffer = (buffer + data).split(b"\n")
                pieces: list[str] = []
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue  # comments (keep-alive), event names, blank separators
                    try:
                        chunk = wire.parse_event(line[5:])
                    except ValueError:
                        failure = f"model '{engine.name}': the remote engine sent an unreadable event"
                        break
                    if chunk is None:
                        done = True
                        break
                    if chunk.error is not None:
                        failure = f"model '{engine.name}': the remote engine failed: {chunk.error}"
                        break
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.finish_reason is not None:
                        finish = chunk.finish_reason
                    if chunk.text:
                        chunks += 1
                        pieces.append(chunk.text)
                        if looping:
                            text += chunk.text
                            if _looping(text, looping):
                                finish, done = "stop", True
                                break
                if pieces:
                    if self._first_at is None:
                        self._first_at = time.monotonic()
                    last = len(pieces) - 1
                    for i, piece in enumerate(pieces):  # the last one waits for no read when the end follows
                        yield StreamDelta(piece, more=i < last or done)
                if failure is not None:
                    ok = False
                    raise BadGateway(failure)
            if usage is None:  # the remote gave none: count
                usage = (wire.count_tokens(self.prompt.prompt_text), chunks)
            self.finish_reason, self.usage = finish or "stop", Usage(*usage)
            ok = True
            self._observe()
            yield StreamDelta("", self.finish_reason, self.usage)
        except aiohttp.ClientError:
            ok = False
            if engine._stopping:
                raise ModelUnavailable(f"model '{engine.name}' was unloaded", headers=RETRY_AFTER) from None
            raise BadGateway(f"model '{engine.name}': the connection to the remote engine broke") from None
        finally:
            if self.finish_reason == "cancelled" or ok is None:
                self.finish_reason = self.finish_reason or "cancelled"
                self._observe(chunks)
            elif ok is False:
                self._observe(chunks, "error")
            if ok:
                self._response.release()  # the connection is reused only when its body was read to the end
            else:
                self._response.close()  # an unfinished stream closes the connection: the remote stops
            self._finish_request(ok)

    def _observe(self, chunks: int | None = None, reason: str | None = None) -> None:
        metrics = self.engine.metrics
        if metrics is None:
            return
        usage = self.usage or Usage(wire.count_tokens(self.prompt.prompt_text), chunks or 0)
        ttft = self._first_at - self.submitted if self._first_at is not None else None
        metrics.observe_generation(self.engine.name, ttft, time.monotonic() - self.submitted, usage.prompt_tokens,
                                   usage.completion_tokens, finish_reason=reason or self.finish_reason)


_CODES = {400: "BAD_REQUEST", 404: "NOT_FOUND", 408: "REQUEST_TIMEOUT", 409: "CONFLICT", 413: "PAYLOAD_TOO_LARGE",
          415: "UNSUPPORTED_MEDIA_TYPE", 422: "INVALID_PARAMETER", 429: "RATE_LIMITED"}
MAX_ERROR_BYTES = 16 * 1024


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """At most MAX_ERROR_BYTES of an error body, then the connection is closed."""
    raw = b""
    try:
        while len(raw) < MAX_ERROR_BYTES:
            part = await response.content.read(MAX_ERROR_BYTES - len(raw))
            if not part:
                break
            raw += part
    except (aiohttp.ClientError, TimeoutError):
        pass
    finally:
        response.close()
    return raw[:MAX_ERROR_BYTES]


def _looping(text: str, times: int) -> bool:
    """Whether the text ends in a unit of up to 24 characters repeated ``times`` times or more."""
    return re.search(r"(.{1,24}?)\1{%d,}$" % (times - 1), text[-2000:], re.DOTALL) is not None
