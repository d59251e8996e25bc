"""Real servers for the remote-engine tests: two instances of our own server (the remotes B and C,
behind an API key), ``transformers serve`` on a tiny checkpoint, and the front server whose
registry points models of kind ``remote`` at them. All started at once, stopped at the end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import requests

from tests.e2e.management_api import ADMIN_PASSWORD
from tests.server_process import ROOT, RemoteServer, free_port

TEXT = "qwen2_5_0_5b"
VLM = "qwen_vl_2b"
REMOTE_KEY = "sk-remote-7f3a9c"   # the remotes' API key: the front sends it, and must never show it
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def remote_env(model: str, urls: list[str], *, framework: str = "openai", **cfg) -> dict[str, str]:
    """CHATVLM_* variables declaring one registry model of kind remote."""
    p = f"CHATVLM_MODELS__{model.upper()}__"
    env = {p + "NAME": f"remote {model}", p + "KIND": "remote", p + "FRAMEWORK": framework,
           p + "REMOTE__BASE_URL": json.dumps(urls)}
    for key, value in cfg.items():
        if key in ("max_queue", "max_pixels"):
            env[p + key.upper()] = str(value)
        else:
            env[p + "REMOTE__" + key.upper()] = value if isinstance(value, str) else json.dumps(value)
    return env


@contextmanager
def transformers_serve(port: int | None = None):
    """``transformers serve`` (the CLI of the installed transformers) on 127.0.0.1, stopped on exit."""
    port = port or free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="tserve-", suffix=".log", delete=False)
    cli = Path(sys.executable).parent / "transformers"
    proc = subprocess.Popen([str(cli), "serve", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env={**os.environ, **OFFLINE},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(proc, url + "/health", 180, log.name)
        yield url
    finally:
        _stop_group(proc)
        log.close()
        Path(log.name).unlink(missing_ok=True)


@contextmanager
def llama_server(binary: Path, gguf: Path):
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "-np", "2", "-c", "1024", "-t", "1", "--host",
                             "127.0.0.1", "--port", str(port)], env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(proc, url + "/health", 120, None)
        yield url
    finally:
        _stop_group(proc)


def _wait_health(proc, url: str, timeout: float, log: str | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}: "
                               + (Path(log).read_text(errors="replace")[-500:] if log else ""))
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def _stop_group(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def remote_models_dir(tmp_path_factory) -> Path:
    from scripts.make_tiny_models import build_tiny_models

    out = tmp_path_factory.mktemp("remote_tiny")
    build_tiny_models(out, [TEXT, VLM])
    return out


class Remotes:
    """Everything the tests talk to."""

    def __init__(self, stack: ExitStack, models_dir: Path, hung_dir: Path) -> None:
        env = {"CHATVLM_AUTH__API_KEYS": json.dumps([REMOTE_KEY]), **OFFLINE}
        self.stack = stack
        self.models_dir = models_dir
        self.remote_env = env
        with ThreadPoolExecutor(4) as pool:  # start them side by side: each takes seconds
            b = pool.submit(self.start_remote)
            c = pool.submit(self.start_remote)
            ts = pool.submit(stack.enter_context, transformers_serve())
            self.b, self.c = stack.enter_context(b.result()), stack.enter_context(c.result())
            self.tserve = ts.result()
        # A real HTTP server that hangs once stopped (SIGSTOP). It has no /health, only /v1/models
        # (a static file): the probes' fallback.
        (hung_dir / "v1").mkdir()
        (hung_dir / "v1" / "models").write_text('{"object": "list", "data": []}')
        self.hung_port = free_port()
        self.hung = subprocess.Popen([sys.executable, "-m", "http.server", str(self.hung_port), "--bind", "127.0.0.1",
                                      "--directory", str(hung_dir)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        stack.callback(self._stop_hung)
        _wait_health(self.hung, f"http://127.0.0.1:{self.hung_port}/v1/models", 30, None)
        self.dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        key = {"api_key": REMOTE_KEY}
        fast = {"health_interval_s": 0.5, "open_s": 1.0, "failure_threshold": 2}
        front_env = {
            "CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD, **OFFLINE,
            **remote_env("rb", [self.b.url], remote_model=TEXT, **key),
            **remote_env("rvl", [self.b.url], remote_model=VLM, vision=True, **key),
            **remote_env("rlong", [self.b.url], framework="vllm", remote_model=TEXT, **key),
            **remote_env("rts", [self.tserve], remote_model=str(models_dir / TEXT)),
            **remote_env("rfail", [self.b.url, self.c.url], remote_model=TEXT, **fast, **key),
            **remote_env("rbound", [self.b.url], remote_model=TEXT, max_concurrency=1, max_queue=1, **key),
            **remote_env("rmissing", [self.b.url], remote_model="no-such-model", **key),
            **remote_env("r5xx", [self.b.url], remote_model="qwen3_vl_8b", **key),  # not installed on B: 503
            **remote_env("rnokey", [self.b.url], remote_model=TEXT),
            **remote_env("rdead", [self.dead_url], remote_model=TEXT),
            **remote_env("rhung", [f"http://127.0.0.1:{self.hung_port}"], remote_model=TEXT, timeout_s=1.0,
                         health_interval_s=600),
        }
        self.front = stack.enter_context(RemoteServer(models_dir=hung_dir, env=front_env, startup_timeout=180))

    def start_remote(self, port: int | None = None) -> RemoteServer:
        """One of our servers as a remote. Like vLLM, it answers /health only once its model is
        loaded (preloaded at start-up; a first load takes a while on a busy machine)."""
        return RemoteServer(models_dir=self.models_dir, env={**self.remote_env, "CHATVLM_MANAGER__PRELOAD": f'["{TEXT}"]'},
                            port=port, startup_timeout=240)

    def _stop_hung(self) -> None:
        if self.hung.poll() is None:
            self.hung.send_signal(signal.SIGCONT)
            self.hung.terminate()
            self.hung.wait(timeout=10)

    def metric(self, server: RemoteServer, name: str, **labels) -> float:
        """A counter of a remote's /metrics (the sum over series matching the labels)."""
        text = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {REMOTE_KEY}"},
                            timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="session")
def remotes(remote_models_dir, tmp_path_factory):
    with ExitStack() as stack:
        yield Remotes(stack, remote_models_dir, tmp_path_factory.mktemp("hung"))
