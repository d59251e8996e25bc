"""A throw-away Redis server for tests: Debian's ``redis-server`` on a free loopback port, in a temp
directory, with no persistence; stopped (by its PID) at the end. scripts/system_deps.sh installs it."""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.server_process import free_port


def redis_bin() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    def __init__(self, binary: str, host: str = "127.0.0.1") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="chatvlm-redis-"))
        self.host, self.port = host, free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", host, "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--protected-mode", "no", "--logfile", str(self.dir / "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
