"""Seed 002's /api/v1 surface against a real server over the tiny checkpoints: the seed's Python
example, the JSON token stream, batches, model loading and the error shape."""
from __future__ import annotations

import json

import pytest
import requests

MAX = 12  # tokens per reply: the tiny models never stop by themselves


def v1(server, path: str) -> str:
    return f"{server.url}/api/v1{path}"


def stream_events(response: requests.Response) -> list[dict]:
    """Read `data: ` lines as JSON, as a simple client of the seed would."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events


def assert_error(r: requests.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and isinstance(err["message"], str) and "details" in err
    return err


def test_seed_python_example(tiny_server):
    def generate_text(prompt, model="default"):
        url = v1(tiny_server, "/generate")
        payload = {
            "prompt": prompt,
            "model": model,
            "max_tokens": MAX,
            "temperature": 0.7
        }

        response = requests.post(url, json=payload)
        return response.json()

    result = generate_text("请写一首关于春天的诗")
    assert isinstance(result["text"], str) and result["text"]
    assert result["usage"]["completion_tokens"] == MAX and result["finish_reason"] == "length"
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + MAX
    assert result["latency"] > 0 and result["model"] == "qwen2_5_0_5b"


def test_stream_matches_non_stream_for_greedy(tiny_server):
    body = {"prompt": "请解释人工智能的概念", "max_tokens": 20, "temperature": 0}
    full = requests.post(v1(tiny_server, "/generate"), json=body, timeout=60).json()
    r = requests.post(v1(tiny_server, "/generate/stream"), json=body, headers={"Accept": "text/event-stream"},
                      stream=True, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = stream_events(r)
    assert all(e["finished"] is False and e["token"] for e in events[:-1])
    last = events[-1]
    assert last["finished"] is True and last["finish_reason"] == "length" and last["usage"] == full["usage"]
    assert "".join(e["token"] for e in events) == full["text"]
    # stream=true on /api/v1/generate answers the same stream
    again = stream_events(requests.post(v1(tiny_server, "/generate"), json={**body, "stream": True}, stream=True,
                                        timeout=60))
    assert "".join(e["token"] for e in again) == full["text"] and again[-1] == last  # pieces may group differently


def test_stop_and_seed(tiny_server):
    base = {"prompt": "hello", "max_tokens": 16, "temperature": 1.0, "seed": 1234}
    a = requests.post(v1(tiny_server, "/generate"), json=base, timeout=60).json()
    b = requests.post(v1(tiny_server, "/generate"), json=base, timeout=60).json()
    assert a["text"] == b["text"]  # a seed makes sampling reproducible
    greedy = requests.post(v1(tiny_server, "/generate"), json={**base, "temperature": 0}, timeout=60).json()["text"]
    stop = greedy[len(greedy) // 2:][:3]
    cut = requests.post(v1(tiny_server, "/generate"), json={**base, "temperature": 0, "stop": [stop, "\x00"]},
                        timeout=60).json()
    assert cut["finish_reason"] == "stop" and cut["text"] == greedy[:greedy.index(stop)]


def test_batch_order_and_item_errors(tiny_server):
    prompts = ["问题1", "问题2", "问题3"]
    alone = [requests.post(v1(tiny_server, "/generate"), json={"prompt": p, "max_tokens": 8, "temperature": 0},
                           timeout=60).json()["text"] for p in prompts]
    reqs = [{"prompt": prompts[0], "max_tokens": 8, "temperature": 0},
            {"prompt": "x", "model": "llama-2-7b-chat"},
            {"prompt": prompts[1], "max_tokens": 8, "temperature": 0},
            {"prompt": prompts[2], "max_tokens": 8, "temperature": 0}]
    r = requests.post(v1(tiny_server, "/batch/generate"), json={"requests": reqs}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert len(results) == 4 and (body["successful"], body["failed"]) == (3, 1)
    assert [results[i]["text"] for i in (0, 2, 3)] == alone  # the same greedy text alone and in a batch
    for i in (0, 2, 3):
        assert results[i]["usage"]["completion_tokens"] == 8 and results[i]["finish_reason"] == "length"
        assert results[i]["latency"] > 0
    assert results[1]["error"]["code"] == "MODEL_NOT_FOUND"  # a run-time failure fails alone
    # An invalid item fails the whole batch up front, naming the item.
    r = requests.post(v1(tiny_server, "/batch/generate"), timeout=10,
                      json={"requests": [reqs[0], {"prompt": "x", "temperature": 7}, {"max_tokens": 3}]})
    error = assert_error(r, 422, "VALIDATION_ERROR")
    assert [d["param"] for d in error["details"]] == ["requests.1.temperature", "requests.2.prompt"]


def test_batch_limits(tiny_server):
    assert_error(requests.post(v1(tiny_server, "/batch/generate"), json={"requests": []}, timeout=10),
                 422, "VALIDATION_ERROR")
    assert_error(requests.post(v1(tiny_server, "/batch/generate"), json={"requests": [{"prompt": "x"}] * 33},
                               timeout=10), 422, "VALIDATION_ERROR")


@pytest.mark.parametrize("payload", [
    {"prompt": ""}, {"prompt": "x", "temperature": -1}, {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "top_p": 1.5}, {"prompt": "x", "stop": [""]}, {"max_tokens": 5}, {"prompt": ["a"]}])
def test_bad_parameters(tiny_server, payload):
    for path in ("/generate", "/generate/stream"):
        assert_error(requests.post(v1(tiny_server, path), json=payload, timeout=10), 422, "VALIDATION_ERROR")


def test_unknown_model_and_too_long_prompt(tiny_server):
    for path in ("/generate", "/generate/stream"):
        assert_error(requests.post(v1(tiny_server, path), json={"prompt": "x", "model": "qwen-7b-chat"}, timeout=10),
                     404, "MODEL_NOT_FOUND")
        r = requests.post(v1(tiny_server, path), json={"prompt": "слово " * 5000, "max_tokens": 8}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"], r.text  # over the context, before queueing


def test_models_load_unload(tiny_server):
    models = {m["name"]: m for m in requests.get(v1(tiny_server, "/models"), timeout=10).json()["models"]}
    text = models["qwen2_5_0_5b"]
    assert text["format"] == "safetensors" and text["size"] and text["installed"] and "generate" in text["tasks"]
    assert {"name", "format", "size", "loaded", "memory_usage"} <= set(text)
    assert not models["qwen3_vl_8b"]["installed"] and models["qwen3_vl_8b"]["reason"]

    err = assert_error(requests.post(v1(tiny_server, "/models/qwen_vl_2b/load"),
                                     json={"quantization": "awq", "prefer_gpu": False}, timeout=10),
                       400, "QUANTIZATION_UNSUPPORTED")
    assert "awq" in err["message"]
    r = requests.post(v1(tiny_server, "/models/qwen_vl_2b/load"), json={"quantization": None, "prefer_gpu": True},
                      timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "loaded" and body["model"] == "qwen_vl_2b" and body["device"] == "cpu"
    assert "GPU" in body["warning"] and body["load_time"] > 0 and body["memory_usage"]
    listed = {m["name"]: m for m in requests.get(v1(tiny_server, "/models"), timeout=10).json()["models"]}
    assert listed["qwen_vl_2b"]["loaded"] is True and listed["qwen_vl_2b"]["memory_usage"]
    r = requests.post(v1(tiny_server, "/models/qwen_vl_2b/unload"), timeout=30)
    assert r.json() == {"status": "unloaded", "model": "qwen_vl_2b", "was_loaded": True}
    listed = {m["name"]: m for m in requests.get(v1(tiny_server, "/models"), timeout=10).json()["models"]}
    assert listed["qwen_vl_2b"]["loaded"] is False

    assert_error(requests.post(v1(tiny_server, "/models/llama-2-7b-chat/load"), timeout=10), 404, "MODEL_NOT_FOUND")
    assert_error(requests.post(v1(tiny_server, "/models/qwen3_vl_8b/load"), json={}, timeout=10), 503,
                 "MODEL_NOT_INSTALLED")


def test_error_mid_stream_is_the_last_event(tiny_server):
    """Unloading the model under a running stream fails it: the error event is the last one."""
    warm = requests.post(v1(tiny_server, "/generate"), json={"prompt": "x", "max_tokens": 1}, timeout=60)
    assert warm.status_code == 200, warm.text
    r = requests.post(v1(tiny_server, "/generate/stream"), json={"prompt": "x", "max_tokens": 3000},
                      stream=True, timeout=60)
    lines = r.iter_lines(decode_unicode=True)
    first = json.loads(next(ln for ln in lines if ln.startswith("data: "))[6:])
    assert first["finished"] is False
    requests.post(v1(tiny_server, "/models/qwen2_5_0_5b/unload"), timeout=30).raise_for_status()
    events = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: ")]
    last = events[-1]
    assert last["finished"] is True and last["error"]["code"] == "MODEL_NOT_AVAILABLE", last
    assert all(e["finished"] is False for e in events[:-1]) and len(events) < 3000
