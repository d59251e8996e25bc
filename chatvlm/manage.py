"""``chatvlm login|logout`` and ``chatvlm models start|stop|logs``: the management service of a
running server (seed 004, ``/api/...``), through ``scripts.chatvlm_client``.

The bearer for ``/api`` is, in order: ``--token``/``$CHATVLM_TOKEN``, the token ``chatvlm login``
saved for that server, or ``--api-key`` (a configured API key counts as admin). Saved tokens live
in ``$CHATVLM_TOKEN_FILE`` (default ``~/.config/chatvlm/tokens.json``, mode 0600), by server URL,
with their expiry; an expired one is dropped. On a terminal, a refused token asks for the user
and password once and signs in again.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

err = Console(stderr=True)


class Refused(Exception):
    """The server said no, or could not be reached: a message for the user and the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def token_file() -> Path:
    if os.environ.get("CHATVLM_TOKEN_FILE"):
        return Path(os.environ["CHATVLM_TOKEN_FILE"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "chatvlm" / "tokens.json"


def _load() -> dict[str, Any]:
    try:
        data = json.loads(token_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(data: dict[str, Any]) -> None:
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a token is a password for an hour
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _key(server: str) -> str:
    return server.rstrip("/")


def saved_token(server: str) -> str | None:
    entry = _load().get(_key(server))
    if not isinstance(entry, dict) or entry.get("expires_at", 0) <= time.time() + 5:
        return None
    return entry.get("access_token")


def save_token(server: str, answer: dict[str, Any]) -> None:
    data = {k: v for k, v in _load().items() if isinstance(v, dict) and v.get("expires_at", 0) > time.time()}
    data[_key(server)] = {"access_token": answer["access_token"], "expires_at": time.time() + answer["expires_in"]}
    _save(data)


def forget_token(server: str) -> bool:
    data = _load()
    if data.pop(_key(server), None) is None:
        return False
    _save(data)
    return True


def login(server: str, username: str, password: str) -> dict[str, Any]:
    from scripts.chatvlm_client import ChatVLMClient

    answer = _guard(server, lambda: ChatVLMClient(server).login(username, password))
    save_token(server, answer)
    return answer


def _guard(server: str, fn: Callable[[], Any]) -> Any:
    import requests

    from scripts.chatvlm_client import APIError

    try:
        return fn()
    except APIError as exc:
        raise Refused(f"{exc.message} ({exc.code or f'HTTP {exc.status}'})") from None
    except requests.RequestException as exc:
        raise Refused(f"cannot reach {server}: {type(exc).__name__} (CONNECTION_FAILED)") from None


def call(server: str, token: str | None, api_key: str | None, fn: Callable[[Any], Any]) -> Any:
    """``fn(client)`` with the best bearer there is; on a terminal, one sign-in when it is refused."""
    from scripts.chatvlm_client import ChatVLMClient

    bearer = token or saved_token(server) or api_key
    try:
        return _guard(server, lambda: _raw(fn, ChatVLMClient(server, api_key=bearer)))
    except _Unauthorized as exc:
        if token or not sys.stdin.isatty():
            raise Refused(f"{exc.message}: sign in with `chatvlm login --server {server}`, or give --token or "
                          "--api-key") from None
    import typer

    err.print(f"[yellow]{server} wants a management sign-in[/yellow]")
    username = typer.prompt("user", default="admin")
    password = typer.prompt("password", hide_input=True)
    bearer = login(server, username, password)["access_token"]
    try:
        return _guard(server, lambda: _raw(fn, ChatVLMClient(server, api_key=bearer)))
    except _Unauthorized as exc:
        raise Refused(exc.message) from None


class _Unauthorized(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _raw(fn: Callable[[Any], Any], client: Any) -> Any:
    from scripts.chatvlm_client import APIError

    try:
        return fn(client)
    except APIError as exc:
        if exc.status == 401:
            raise _Unauthorized(f"{exc.message} ({exc.code or 'HTTP 401'})") from None
        raise


def wait_task(server: str, token: str | None, api_key: str | None, task_id: str, timeout: float) -> dict[str, Any]:
    """Poll a lifecycle task until it succeeds or fails (or ``timeout`` seconds pass: the task goes on)."""
    deadline = time.monotonic() + timeout
    while True:
        task = call(server, token, api_key, lambda c: c.task(task_id))
        if task["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return task
        time.sleep(0.3)


def print_log_line(line: dict[str, Any]) -> None:
    sys.stdout.write(f"{line['timestamp']}  {line['level']:<7} {line['message']}\n")
    sys.stdout.flush()
