"""Python clients for the vision core API (seed 003).

``ChatVLMClient`` keeps the seed's methods and return values (``health``, ``ocr`` -> text,
``chat`` -> answer) and adds ``models``, ``batch_ocr``, ``load`` and ``unload``;
``AsyncChatVLMClient`` is the same over aiohttp. Errors raise ``APIError`` carrying
the status and the server's stable code instead of a KeyError on a missing field.

    python scripts/chatvlm_client.py ocr samples/receipt_en.png --model rapidocr
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import requests


class APIError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        self.code = body.get("code") if isinstance(body, dict) else None
        self.message = error_message(body)
        if self.code is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
            self.code = body["error"].get("code")  # the OpenAI and spec-v1 shapes nest it
        super().__init__(f"HTTP {status}: {self.message}")


def error_message(body: Any) -> str:
    """The server's message in any surface's error shape (detail, error.message or error)."""
    if isinstance(body, dict):
        if isinstance(body.get("detail"), str):
            return body["detail"]
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(body)


def _params(**kw: Any) -> Dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


class ChatVLMClient:
    def __init__(self, base_url: str = "http://localhost:8000", timeout: float = 120.0,
                 api_key: Optional[str] = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _check(self, response: requests.Response) -> Dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise APIError(response.status_code, body)
        return body

    def health(self) -> Dict:
        return self._check(self.session.get(f"{self.base_url}/health", timeout=self.timeout))

    def models(self) -> Dict:
        return self._check(self.session.get(f"{self.base_url}/models", timeout=self.timeout))

    def ocr_result(self, image_path: str, model: Optional[str] = None, language: Optional[str] = None,
                   format: Optional[str] = None) -> Dict:
        """The whole /ocr answer: text, model, blocks, image_size, processing_time."""
        return self.ocr_document(Path(image_path).read_bytes(), Path(image_path).name, model, language, format)

    def ocr_document(self, data: bytes, filename: str = "upload", model: Optional[str] = None,
                     language: Optional[str] = None, format: Optional[str] = None,
                     pages: Optional[str] = None) -> Dict:
        """/ocr of an image or PDF given as bytes; ``format`` is text, markdown or json; ``pages``
        selects PDF pages, 1-based ("1-3,7")."""
        response = self.session.post(f"{self.base_url}/ocr", files={"file": (filename, data)},
                                     params=_params(model=model, language=language, format=format, pages=pages),
                                     timeout=self.timeout)
        return self._check(response)

    def chat_stream(self, prompt: str, image: Optional[bytes] = None, model: Optional[str] = None,
                    temperature: Optional[float] = None, max_tokens: Optional[int] = None) -> Iterator[str]:
        """Stream an answer through /v1/chat/completions (the image as a data: URL); yields text pieces.
        Closing the generator closes the connection, which stops the generation on the server."""
        content: Any = prompt
        if image is not None:
            url = "data:application/octet-stream;base64," + base64.b64encode(image).decode("ascii")
            content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
        body = _params(model=model or "default", temperature=temperature, max_tokens=max_tokens)
        body.update(stream=True, messages=[{"role": "user", "content": content}])
        with self.session.post(f"{self.base_url}/v1/chat/completions", json=body, stream=True,
                               timeout=self.timeout) as response:
            if response.status_code >= 400:
                self._check(response)
            for line in response.iter_lines(decode_unicode=False):
                if not line.startswith(b"data:"):
                    continue  # keep-alive comments and blank separators
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:  # failed after the stream started: an error event, then [DONE]
                    raise APIError(response.status_code, chunk)
                for choice in chunk.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece

    def ocr(self, image_path: str, model: Optional[str] = None, language: Optional[str] = None) -> str:
        return self.ocr_result(image_path, model, language)["text"]

    def chat(self, image_path: str, prompt: str, model: Optional[str] = None,
             temperature: Optional[float] = None, max_tokens: Optional[int] = None) -> str:
        with open(image_path, "rb") as f:
            response = self.session.post(
                f"{self.base_url}/chat", files={"file": (Path(image_path).name, f)},
                data=_params(prompt=prompt, model=model, temperature=temperature, max_tokens=max_tokens),
                timeout=self.timeout)
        return self._check(response)["response"]

    def batch_ocr(self, image_paths: List[str], model: Optional[str] = None,
                  language: Optional[str] = None) -> Dict:
        handles = [open(p, "rb") for p in image_paths]
        try:
            files = [("files", (Path(p).name, h)) for p, h in zip(image_paths, handles)]
            response = self.session.post(f"{self.base_url}/batch/ocr", files=files,
                                         params=_params(model=model, language=language), timeout=self.timeout)
        finally:
            for h in handles:
                h.close()
        return self._check(response)

    def submit_ocr_job(self, data: bytes, filename: str = "upload", model: Optional[str] = None,
                       language: Optional[str] = None, format: Optional[str] = None,
                       pages: Optional[str] = None) -> Dict:
        """POST /jobs/ocr: a long document read as a job; returns ``{job_id, status, position}``."""
        response = self.session.post(f"{self.base_url}/jobs/ocr", files={"file": (filename, data)},
                                     data=_params(model=model, language=language, format=format, pages=pages),
                                     timeout=self.timeout)
        return self._check(response)

    def job(self, job_id: str) -> Dict:
        """GET /jobs/{id}: status, pages_done, pages_total, error."""
        return self._check(self.session.get(f"{self.base_url}/jobs/{job_id}", timeout=self.timeout))

    def job_result(self, job_id: str) -> Dict:
        """GET /jobs/{id}/result: the finished job's answer, the same body as /ocr."""
        return self._check(self.session.get(f"{self.base_url}/jobs/{job_id}/result", timeout=self.timeout))

    def cancel_job(self, job_id: str) -> Dict:
        return self._check(self.session.delete(f"{self.base_url}/jobs/{job_id}", timeout=self.timeout))

    # ---- the management service (seed 004, /api/...): a login token, or an API key (as admin) ----
    def login(self, username: str, password: str) -> Dict:
        """POST /api/auth/token: ``{access_token, token_type, expires_in}``; later calls of this client use it."""
        body = self._check(self.session.post(f"{self.base_url}/api/auth/token", timeout=self.timeout,
                                             json={"username": username, "password": password}))
        self.session.headers["Authorization"] = f"Bearer {body['access_token']}"
        return body

    def lifecycle(self, model: str, action: str, force: bool = False, timeout: Optional[float] = None) -> Dict:
        """POST /api/models/{id}/start|stop|restart: 202 with ``{message, task_id}``."""
        body = {"force": force, **({"timeout": timeout} if timeout else {})}
        return self._check(self.session.post(f"{self.base_url}/api/models/{model}/{action}", json=body,
                                             timeout=self.timeout))

    def task(self, task_id: str) -> Dict:
        """GET /api/tasks/{id}: a lifecycle task's status and error."""
        return self._check(self.session.get(f"{self.base_url}/api/tasks/{task_id}", timeout=self.timeout))

    def model_logs(self, model: str, lines: int = 100) -> List[Dict]:
        """GET /api/models/{id}/logs: the last lines, ``{timestamp, level, message}`` each."""
        return self._check(self.session.get(f"{self.base_url}/api/models/{model}/logs", params={"lines": lines},
                                            timeout=self.timeout))["logs"]

    def follow_model_logs(self, model: str, lines: int = 100) -> Iterator[Dict]:
        """The last lines, then each new one as it is written (SSE), until the generator is closed."""
        with self.session.get(f"{self.base_url}/api/models/{model}/logs", params={"lines": lines, "follow": "true"},
                              stream=True, timeout=(self.timeout, None)) as response:
            if response.status_code >= 400:
                self._check(response)
            for line in response.iter_lines(decode_unicode=False):
                if line.startswith(b"data:"):
                    yield json.loads(line[5:].strip())

    def load(self, model: str) -> Dict:
        return self._check(self.session.post(f"{self.base_url}/models/{model}/load", timeout=self.timeout))

    def unload(self, model: str) -> Dict:
        return self._check(self.session.delete(f"{self.base_url}/models/{model}", timeout=self.timeout))


class AsyncChatVLMClient:
    """The same calls over aiohttp; use as ``async with AsyncChatVLMClient(url) as c: ...``."""

    def __init__(self, base_url: str = "http://localhost:8000", timeout: float = 120.0) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: Any = None

    async def __aenter__(self) -> "AsyncChatVLMClient":
        self._session = self._aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._session.close()

    async def _check(self, response: Any) -> Dict:
        try:
            body = await response.json(content_type=None)
        except ValueError:
            body = await response.text()
        if response.status >= 400:
            raise APIError(response.status, body)
        return body

    async def health(self) -> Dict:
        async with self._session.get(f"{self.base_url}/health") as r:
            return await self._check(r)

    async def models(self) -> Dict:
        async with self._session.get(f"{self.base_url}/models") as r:
            return await self._check(r)

    async def ocr_result(self, image_path: str, model: Optional[str] = None,
                         language: Optional[str] = None) -> Dict:
        data = self._aiohttp.FormData()
        data.add_field("file", Path(image_path).read_bytes(), filename=Path(image_path).name)
        async with self._session.post(f"{self.base_url}/ocr", data=data,
                                      params=_params(model=model, language=language)) as r:
            return await self._check(r)

    async def ocr(self, image_path: str, model: Optional[str] = None, language: Optional[str] = None) -> str:
        return (await self.ocr_result(image_path, model, language))["text"]

    async def chat(self, image_path: str, prompt: str, model: Optional[str] = None,
                   temperature: Optional[float] = None, max_tokens: Optional[int] = None) -> str:
        data = self._aiohttp.FormData()
        data.add_field("file", Path(image_path).read_bytes(), filename=Path(image_path).name)
        for key, value in _params(prompt=prompt, model=model, temperature=temperature,
                                  max_tokens=max_tokens).items():
            data.add_field(key, str(value))
        async with self._session.post(f"{self.base_url}/chat", data=data) as r:
            return (await self._check(r))["response"]

    async def batch_ocr(self, image_paths: List[str], model: Optional[str] = None,
                        language: Optional[str] = None) -> Dict:
        data = self._aiohttp.FormData()
        for p in image_paths:
            data.add_field("files", Path(p).read_bytes(), filename=Path(p).name)
        async with self._session.post(f"{self.base_url}/batch/ocr", data=data,
                                      params=_params(model=model, language=language)) as r:
            return await self._check(r)

    async def unload(self, model: str) -> Dict:
        async with self._session.delete(f"{self.base_url}/models/{model}") as r:
            return await self._check(r)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="ChatVLMLLM command-line client")
    parser.add_argument("--url", default=os.environ.get("CHATVLM_URL", "http://127.0.0.1:8000"))
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("health")
    sub.add_parser("models")
    p = sub.add_parser("ocr")
    p.add_argument("image")
    p.add_argument("--model")
    p.add_argument("--language")
    p = sub.add_parser("chat")
    p.add_argument("image")
    p.add_argument("prompt")
    p.add_argument("--model")
    p = sub.add_parser("batch")
    p.add_argument("images", nargs="+")
    p.add_argument("--model")
    p = sub.add_parser("unload")
    p.add_argument("model")
    args = parser.parse_args(argv)
    client = ChatVLMClient(args.url)
    try:
        if args.cmd == "ocr":
            print(client.ocr(args.image, args.model, args.language))
        elif args.cmd == "chat":
            print(client.chat(args.image, args.prompt, args.model))
        elif args.cmd == "batch":
            print(json.dumps(client.batch_ocr(args.images, args.model), ensure_ascii=False, indent=2))
        elif args.cmd == "unload":
            print(json.dumps(client.unload(args.model), indent=2))
        else:
            print(json.dumps(getattr(client, args.cmd)(), ensure_ascii=False, indent=2))
    except APIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
