"""Real notification receivers for the alert tests: an HTTP server that records webhook POSTs and
an ``aiosmtpd`` SMTP server that records mail, both on free loopback ports, in threads."""
from __future__ import annotations

import json
import threading
import time
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller


class WebhookReceiver:
    """Records each POST (path, headers, JSON body). ``replies`` is a list of statuses answered in
    turn (then 200); a 3xx reply carries a Location back to this server."""

    def __init__(self, replies: list[int] | None = None) -> None:
        self.posts: list[dict] = []
        self.replies = list(replies or [])
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer._lock:
                    status = outer.replies.pop(0) if outer.replies else 200
                    outer.posts.append({"path": self.path, "headers": dict(self.headers), "status": status,
                                        "json": json.loads(body) if body else None})
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", f"http://127.0.0.1:{outer.port}/redirected")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def accepted(self) -> list[dict]:
        """The payloads answered 2xx."""
        with self._lock:
            return [p["json"] for p in self.posts if 200 <= p["status"] < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SmtpReceiver:
    """An aiosmtpd server that keeps every message it is handed. With ``tls_context`` it requires
    STARTTLS; with ``logins`` ({user: password}) it requires AUTH (over TLS)."""

    def __init__(self, tls_context=None, logins: dict[str, str] | None = None) -> None:
        self.messages: list[Message] = []
        self.logged_in: list[str] = []
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
                msg = message_from_bytes(envelope.original_content or envelope.content)
                msg["X-Envelope-To"] = ",".join(envelope.rcpt_tos)
                outer.messages.append(msg)
                return "250 OK"

        from tests.server_process import free_port

        self.port = free_port()
        kwargs = {}
        if tls_context is not None:
            kwargs.update(tls_context=tls_context, require_starttls=True)
        if logins is not None:
            from aiosmtpd.smtp import AuthResult

            def authenticate(server, session, envelope, mechanism, auth_data):
                user = auth_data.login.decode()
                ok = logins.get(user) == auth_data.password.decode()
                if ok:
                    outer.logged_in.append(user)
                return AuthResult(success=ok)

            kwargs.update(authenticator=authenticate, auth_required=True)
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **kwargs)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy; returns its value (or the last falsy one at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
