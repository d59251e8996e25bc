"""SIGTERM with a drain announcement: /readyz turns 503 while the server still serves, then
new connections are refused and the process exits."""
from __future__ import annotations

import signal
import time

import httpx

from tests.server_process import RemoteServer


def test_sigterm_announces_not_ready_before_stopping(tmp_path):
    server = RemoteServer(models_dir=tmp_path / "weights",
                          env={"CHATVLM_SERVER__DRAIN_ANNOUNCE_S": "1.5", "CHATVLM_SERVER__GRACEFUL_TIMEOUT_S": "2"})
    try:
        assert httpx.get(server.url + "/readyz").status_code == 200
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        seen = []
        refused_at = None
        while time.monotonic() - sent < 10 and server.proc.poll() is None:
            try:
                seen.append((httpx.get(server.url + "/readyz", timeout=1).status_code,
                             httpx.get(server.url + "/health", timeout=1).status_code))
            except httpx.TransportError:
                refused_at = time.monotonic() - sent
                break
            time.sleep(0.1)
        assert seen and all(s == (503, 200) for s in seen), seen  # not ready, still serving
        assert refused_at is not None and refused_at >= 1.4
        server.proc.wait(timeout=10)
    finally:
        server.stop()
