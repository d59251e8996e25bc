"""Start the real server in a subprocess on a free port, for end-to-end tests and benchmarks."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


_given_ports: set[int] = set()
_given_lock = threading.Lock()


def free_port() -> int:
    """A port free now that this process has not handed out before. The kernel may give a port
    just released to the very next ``bind(0)``, so two calls in a row (one ``ray start`` takes six)
    could otherwise name the same port twice."""
    with _given_lock:
        for _ in range(10_000):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _given_ports:
                _given_ports.add(port)
                return port
    raise RuntimeError("no free port left that this process has not handed out")


class RemoteServer:
    """``python api.py`` with the given flags and CHATVLM_* environment, stopped on exit.

    Each server gets a fresh data directory (its database, secrets and caches), removed when it
    stops, unless one is passed (``data_dir``: a restart test passes the same one twice) or the
    environment names one (CHATVLM_DATA_DIR). ``launcher="uvicorn"`` starts ``uvicorn api:app``
    instead, on ``host`` (settings then come from the environment only)."""

    def __init__(self, *, models_dir: Path | None = None, config: Path | None = None,
                 env: dict[str, str] | None = None, startup_timeout: float = 60.0,
                 data_dir: Path | None = None, launcher: str = "api", host: str = "127.0.0.1",
                 port: int | None = None, new_session: bool = False) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile("w+", prefix="chatvlm-server-", suffix=".log", delete=False)
        full_env = {**os.environ, "CHATVLM_SERVER__LOG_LEVEL": "warning", **(env or {})}
        self._own_data_dir: Path | None = None
        if data_dir is not None:
            full_env["CHATVLM_DATA_DIR"] = str(data_dir)
        elif "CHATVLM_DATA_DIR" not in (env or {}):
            self._own_data_dir = Path(tempfile.mkdtemp(prefix="chatvlm-data-"))
            full_env["CHATVLM_DATA_DIR"] = str(self._own_data_dir)
        self.data_dir = Path(full_env["CHATVLM_DATA_DIR"])
        if launcher == "uvicorn":
            args = [sys.executable, "-m", "uvicorn", "api:app", "--host", host, "--port", str(self.port),
                    "--log-level", "warning"]
            if config:
                full_env["CHATVLM_CONFIG"] = str(config)
            if models_dir:
                full_env["CHATVLM_MODELS_DIR"] = str(models_dir)
        else:
            args = [sys.executable, str(ROOT / "api.py"), "--host", host, "--port", str(self.port)]
            if config:
                args += ["--config", str(config)]
            if models_dir:
                args += ["--models-dir", str(models_dir)]
        # Converted weights (the SmolLM2 GGUF) are shared by every test server: converted once.
        full_env.setdefault("CHATVLM_CACHE_DIR", str(Path(tempfile.gettempdir()) / "chatvlm-test-cache"))
        # new_session: a scheduler autogroup of its own, as a separately started service has
        self.proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=new_session)
        self._wait(startup_timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start within {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_data_dir is not None:
            shutil.rmtree(self._own_data_dir, ignore_errors=True)

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs (the data directory is kept for a restart)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "RemoteServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
