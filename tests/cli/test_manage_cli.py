"""``chatvlm login|logout`` and ``chatvlm models start|stop|logs`` against a real server's
management service, run as processes (stdin is not a terminal: no password prompt)."""
from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import time

import requests

from tests.cli.conftest import SAMPLES, chatvlm, cli_env
from tests.server_process import ROOT

MODEL = "tesseract"


def _ctrl_c_as_in_a_terminal() -> None:
    """A shell without job control starts background commands with SIGINT ignored, and a Python
    started with SIGINT ignored keeps ignoring it; a user's terminal gives the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_login_start_stop_and_logs(request, tmp_path):
    server = request.getfixturevalue("ocr_server")
    env = {**cli_env(tmp_path), "CHATVLM_TOKEN_FILE": str(tmp_path / "tokens.json")}
    at = ["--server", server.url]
    refused = chatvlm("models", "start", MODEL, *at, env=env)
    assert refused.returncode == 1 and "chatvlm login --server" in refused.stderr, refused.stderr
    wrong = chatvlm("login", *at, "--password", "not-the-password", env=env)
    assert wrong.returncode == 1 and "AUTHENTICATION_FAILED" in wrong.stderr, wrong.stderr
    password = (server.data_dir / "initial_admin_password").read_text().strip()
    signed_in = chatvlm("login", *at, "--user", "admin", "--password", password, env=env)
    assert signed_in.returncode == 0, signed_in.stderr
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600
    assert server.url in json.loads((tmp_path / "tokens.json").read_text())

    started = chatvlm("models", "start", MODEL, *at, env=env)
    assert started.returncode == 0, started.stderr
    task = json.loads(started.stdout)
    assert task["status"] == "succeeded" and task["action"] == "start"
    assert MODEL in requests.get(server.url + "/health", timeout=10).json()["loaded_models"]

    # logs --follow prints the stop while it happens.
    follow = subprocess.Popen([sys.executable, "-m", "chatvlm", "models", "logs", MODEL, "--follow", "-n", "5", *at],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_ctrl_c_as_in_a_terminal)
    time.sleep(2)
    stopped = chatvlm("models", "stop", MODEL, *at, env=env)
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["status"] == "succeeded", stopped.stderr
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(line.rstrip().endswith(" stopped") for line in lines):
        lines.append(follow.stdout.readline())
    follow.send_signal(signal.SIGINT)
    follow.communicate(timeout=30)
    assert follow.returncode == 130
    assert any("running: loaded in" in line for line in lines) and any(" stopped" in line for line in lines), lines

    ocr = requests.post(server.url + "/ocr", files={"file": (SAMPLES / "receipt_en.png").open("rb")},
                        data={"model": MODEL}, timeout=60)
    assert ocr.status_code == 503 and ocr.json()["code"] == "MODEL_NOT_RUNNING"
    recent = chatvlm("models", "logs", MODEL, "-n", "20", *at, env=env)
    assert recent.returncode == 0 and "INFO" in recent.stdout and "stopping" in recent.stdout
    assert chatvlm("models", "start", MODEL, *at, env=env).returncode == 0  # leave it as it was found

    assert chatvlm("logout", *at, env=env).returncode == 0
    after = chatvlm("models", "logs", MODEL, *at, env=env)
    assert after.returncode == 1 and "chatvlm login" in after.stderr
    unknown = chatvlm("models", "stop", "no_such_model", *at, "--token", "not-a-token", env=env)
    assert unknown.returncode == 1 and "AUTHENTICATION_FAILED" in unknown.stderr
    assert chatvlm("models", "start", MODEL, env=env).returncode == 2  # no --server: a usage error
