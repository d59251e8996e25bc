"""Seed 002's load with `quantization` on the real server: int8 / q8_0 (q4_0 / int4) load the model int8 (int4)
weight-only (reloading it when it ran at another precision), and it then generates; what cannot
be honoured keeps its 400."""
from __future__ import annotations

import pytest
import requests

from tests.e2e.test_spec_v1_e2e import assert_error, v1

pytestmark = pytest.mark.timeout(300)


def load(server, model: str, **body) -> requests.Response:
    return requests.post(v1(server, f"/models/{model}/load"), json=body, timeout=120)


def generate(server, model: str) -> dict:
    r = requests.post(v1(server, "/generate"), json={"prompt": "Hello", "model": model, "max_tokens": 5,
                                                     "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_int8_load_reloads_then_generates_and_sticks(tiny_server):
    model = "qwen2_5_0_5b"
    first = load(tiny_server, model, quantization="none")
    assert first.status_code == 200, first.text
    assert "int8" not in first.json()["precision"]
    generate(tiny_server, model)

    r = load(tiny_server, model, quantization="q8_0")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["precision"].endswith("+int8_weight_only") and body["already_loaded"] is False
    assert generate(tiny_server, model)["usage"]["completion_tokens"] == 5

    again = load(tiny_server, model)  # null: whatever it runs at now
    assert again.json()["already_loaded"] is True and again.json()["precision"] == body["precision"]
    same = load(tiny_server, model, quantization="int8")
    assert same.json()["already_loaded"] is True

    r = load(tiny_server, model, quantization="q4_0")  # the seed's example: int4 weight-only
    assert r.status_code == 200, r.text
    assert r.json()["precision"].endswith("+int4_weight_only") and r.json()["already_loaded"] is False
    assert generate(tiny_server, model)["usage"]["completion_tokens"] == 5

    err = assert_error(load(tiny_server, model, quantization="awq"), 400, "QUANTIZATION_UNSUPPORTED")
    assert "awq" in err["message"]
    back = load(tiny_server, model, quantization="none")  # leave it as the other tests expect
    assert back.status_code == 200 and "int8" not in back.json()["precision"]
