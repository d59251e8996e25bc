"""Quick schemathesis run (scripts/run_schemathesis.py) against a real server on the tiny
checkpoints: every operation in /openapi.json, positive and negative data, a small
max-examples budget and a fixed seed. The full run is the script."""
from __future__ import annotations

import httpx
import pytest

from scripts.run_schemathesis import run
from tests.server_process import RemoteServer

ADMIN_PASSWORD = "schema-admin-pass"


@pytest.fixture(scope="module")
def server(tiny_models_dir):
    with RemoteServer(models_dir=tiny_models_dir, env={"CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD}) as srv:
        yield srv


def test_schemathesis_no_internal_errors(server):
    # An admin token, so the management routes (seed 004) are exercised past their auth check. The
    # time budget covers their operations too, and the load route's quantization examples (int8,
    # q8_0, none), which really reload a model at that precision, a few seconds each.
    token = httpx.post(server.url + "/api/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD},
                       timeout=30).json()["access_token"]
    res = run(server.url, max_examples=2, max_time=180, phases="examples,fuzzing",
              checks="not_a_server_error", seed=1, request_timeout=20,
              extra=["-H", f"Authorization: Bearer {token}"])
    assert res["operations"] == res["operations_in_schema"]
    # 503 with a documented code (model not installed) is an answer; 500-502 are bugs.
    assert res["internal_errors_500_502"] == 0, res["output"][-4000:]


# Found by the full run: a vanishing positive temperature overflowed the logits (was a 500).
@pytest.mark.parametrize("path,body", [
    ("/api/v1/llm/generate/", {"prompt": "0", "model": "qwen2_5_0_5b",
                               "parameters": {"temperature": 1.175494351e-38, "max_length": 4}}),
    ("/v1/completions", {"model": "qwen2_5_0_5b", "prompt": "0", "max_tokens": 4, "temperature": 1e-38}),
])
def test_tiny_temperature_is_not_a_server_error(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code < 500, r.text
