"""``chatvlm chat`` (streaming) and ``chatvlm models`` in-process and against a real server."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests

from tests.cli.conftest import SAMPLES, chatvlm, cli_env
from tests.server_process import ROOT, RemoteServer


@pytest.fixture(scope="module")
def tiny_server(tiny_models_dir):
    with RemoteServer(models_dir=tiny_models_dir) as server:
        yield server


def test_chat_streams_to_the_terminal_through_the_server(tiny_server, tmp_path):
    """The answer arrives in pieces: the first bytes are on stdout before the process ends."""
    args = [sys.executable, "-m", "chatvlm", "chat", str(SAMPLES / "receipt_en.png"), "What is the total?",
            "--model", "qwen_vl_2b", "--max-tokens", "400", "--server", tiny_server.url]
    proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)  # blocks until the first streamed piece is written
    seen_running = proc.poll() is None
    rest, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert first and len(first + rest) > 20
    assert seen_running  # text arrived while generation was still going


def test_chat_in_process_on_the_tiny_vlm(tiny_models_dir, tmp_path):
    run = chatvlm("chat", str(SAMPLES / "receipt_en.png"), "Describe it", "--model", "qwen_vl_2b",
                  "--max-tokens", "8", "--models-dir", str(tiny_models_dir), env=cli_env(tmp_path))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()


def test_chat_errors_are_the_servers_message(tiny_server, tmp_path):
    run = chatvlm("chat", str(SAMPLES / "receipt_en.png"), "hi", "--model", "rapidocr", "--server", tiny_server.url,
                  env=cli_env(tmp_path))
    assert run.returncode == 1
    assert "rapidocr" in run.stderr and "MODEL_CAPABILITY_MISSING" in run.stderr


def test_models_ls_ps_load_unload_against_the_server(tiny_server, tmp_path):
    env = cli_env(tmp_path)
    server = ["--server", tiny_server.url]
    listing = [json.loads(line) for line in chatvlm("models", "ls", *server, env=env).stdout.splitlines()]
    by_id = {m["id"]: m for m in listing}
    assert by_id["rapidocr"]["installed"] and by_id["qwen_vl_2b"]["installed"]
    assert not by_id["qwen_vl_7b"]["installed"] and by_id["qwen_vl_7b"]["reason"].startswith("no weights at")
    load = chatvlm("models", "load", "rapidocr", *server, env=env)
    assert load.returncode == 0 and json.loads(load.stdout)["status"] == "success"
    assert "rapidocr" in requests.get(tiny_server.url + "/health", timeout=10).json()["loaded_models"]
    ps = [json.loads(line)["id"] for line in chatvlm("models", "ps", *server, env=env).stdout.splitlines()]
    assert "rapidocr" in ps and "qwen_vl_7b" not in ps
    unload = chatvlm("models", "unload", "rapidocr", *server, env=env)
    assert unload.returncode == 0 and "unloaded" in json.loads(unload.stdout)["message"]
    assert "rapidocr" not in requests.get(tiny_server.url + "/health", timeout=10).json()["loaded_models"]
    missing = chatvlm("models", "load", "no_such_model", *server, env=env)
    assert missing.returncode == 1 and "MODEL_NOT_FOUND" in missing.stderr


def test_models_in_process(tmp_path):
    env = cli_env(tmp_path)
    local = ["--models-dir", str(tmp_path / "weights")]
    listing = {json.loads(line)["id"]: json.loads(line) for line in
               chatvlm("models", "ls", *local, env=env).stdout.splitlines()}
    assert listing["rapidocr"]["installed"] and not listing["qwen3_vl_2b"]["installed"]
    load = chatvlm("models", "load", "rapidocr", *local, env=env)
    assert load.returncode == 0 and json.loads(load.stdout)["load_time"] > 0
    not_installed = chatvlm("models", "load", "qwen3_vl_2b", *local, env=env)
    assert not_installed.returncode == 1 and "MODEL_NOT_INSTALLED" in not_installed.stderr


def test_api_key_is_sent(tmp_path):
    with RemoteServer(models_dir=tmp_path / "w", env={"CHATVLM_AUTH__API_KEYS": '["cli-key-123456"]'}) as server:
        refused = chatvlm("models", "ls", "--server", server.url, env=cli_env(tmp_path))
        assert refused.returncode == 1 and "UNAUTHORIZED" in refused.stderr
        ok = chatvlm("models", "ls", "--server", server.url, "--api-key", "cli-key-123456", env=cli_env(tmp_path))
        assert ok.returncode == 0 and "rapidocr" in ok.stdout
        via_env = chatvlm("ocr", str(SAMPLES / "receipt_en.png"), "--server", server.url,
                          env={**cli_env(tmp_path), "CHATVLM_API_KEY": "cli-key-123456"})
        assert via_env.returncode == 0 and "CORNER MARKET" in via_env.stdout


def test_every_subcommand_has_help_with_an_example():
    for args in (["--help"], ["serve", "--help"], ["ocr", "--help"], ["chat", "--help"], ["models", "--help"],
                 ["models", "ls", "--help"], ["models", "ps", "--help"], ["models", "load", "--help"],
                 ["models", "unload", "--help"]):
        run = chatvlm(*args, env={**cli_env(ROOT), "COLUMNS": "200"})
        assert run.returncode == 0, (args, run.stderr)
        if args != ["--help"]:
            assert "chatvlm " in run.stdout and "Example" in run.stdout, args


def test_serve_takes_the_same_flags_as_api_py(tmp_path):
    from tests.server_process import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatvlm", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--models-dir", str(tmp_path / "w")], cwd=ROOT, env=cli_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ui/", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["status"] == "healthy"
        assert "ChatVLMLLM playground" in requests.get(f"http://127.0.0.1:{port}/ui/", timeout=5).text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    refused = chatvlm("serve", "--host", "0.0.0.0", env=cli_env(tmp_path))  # no keys: refused, as api.py does
    assert refused.returncode == 2
