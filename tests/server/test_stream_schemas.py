"""The JSON generation surfaces against their own OpenAPI: every SSE event a real stream sends
(tokens, end markers, errors mid-stream) matches the event schema its route declares, and JSON
bodies are taken as JSON Schema reads them (no lax coercion of booleans, numbers or strings)."""
from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient

from llm.types import ChatMessage, GenerateInput
from server.app import create_app
from tests.conftest import fake_settings
from tests.server.test_llm_serializers import ScriptedLLM


class PromptLLM(ScriptedLLM):
    """ScriptedLLM that also streams raw prompts (/v1/completions)."""

    async def stream(self, inp: GenerateInput, *, timeout_s=None):
        if inp.prompt is not None:
            inp = GenerateInput(messages=[ChatMessage("user", inp.prompt)], model=inp.model, params=inp.params)
        return await super().stream(inp, timeout_s=timeout_s)


@pytest.fixture
def client(tmp_path, fake_kind):
    app = create_app(fake_settings(tmp_path, {"fast": {}}))
    app.state.services.llm = PromptLLM()
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def parse_events(body: str) -> list[dict[str, Any]]:
    """Events as schemathesis (and the SSE spec) read them: data lines joined, event defaulted."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        data = [ln[5:].removeprefix(" ") for ln in block.split("\n") if ln.startswith("data:")]
        if data:
            events.append({"data": "\n".join(data), "event": "message"})
    return events


def _valid(schema: Any, value: Any) -> bool:
    return jsonschema_rs.validator_for(schema).is_valid(value)


def _data_matches(schema: dict[str, Any], data: str) -> bool:
    """``data`` against its schema, including contentMediaType/contentSchema (an annotation for
    JSON Schema validators, asserted by schemathesis: so asserted here too)."""
    if "anyOf" in schema:
        return any(_data_matches(branch, data) for branch in schema["anyOf"])
    if not _valid({k: v for k, v in schema.items() if k != "contentSchema"}, data):
        return False
    if schema.get("contentMediaType") == "application/json":
        try:
            payload = json.loads(data)
        except ValueError:
            return False
        return _valid(schema["contentSchema"], payload)
    return True


def check_stream(openapi: dict, path: str, body: str) -> list[dict[str, Any]]:
    schema = openapi["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert schema["type"] == "object" and schema["required"] == ["data"]
    events = parse_events(body)
    assert events
    for event in events:
        assert _valid(schema, event), event
        assert _data_matches(schema["properties"]["data"], event["data"]), (path, event["data"])
    return events


# (path, body, whether the request streams a failure after the start: prompt "fail")
STREAMS = [
    ("/generate", {}), ("/api/v1/generate", {"stream": True}), ("/api/v1/generate/stream", {}),
    ("/api/v1/llm/generate/stream/", {}),
    ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"stream": True}),
]


def _request(path: str, prompt: str, extra: dict) -> dict:
    if path == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": prompt}], **extra}
    return {"prompt": prompt, **extra}


@pytest.mark.parametrize("path,extra", STREAMS)
@pytest.mark.parametrize("prompt", ["one two\nthree", "fail"])
def test_stream_events_match_the_declared_schema(client, path, extra, prompt):
    openapi = client.get("/openapi.json").json()
    r = client.post(path, json=_request(path, prompt, extra))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = check_stream(openapi, path, r.text)
    if prompt == "fail":  # the error event is in the stream (and matched the schema above)
        assert any("error" in e["data"] or "ERROR" in e["data"] for e in events)


def test_event_schema_refuses_what_the_server_never_sends(client):
    openapi = client.get("/openapi.json").json()
    data = openapi["paths"]["/api/v1/generate/stream"]["post"]["responses"]["200"]["content"][
        "text/event-stream"]["schema"]["properties"]["data"]
    assert not _data_matches(data, '{"token": 1, "finished": false}')
    assert not _data_matches(data, "[DONE]")
    chat = openapi["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"][
        "text/event-stream"]["schema"]["properties"]["data"]
    assert _data_matches(chat, "[DONE]") and not _data_matches(chat, "[END]")


# ---- strict JSON bodies ---------------------------------------------------------------------------
@pytest.mark.parametrize("path,body", [
    ("/generate", {"prompt": "x", "stream": 0}),
    ("/generate", {"prompt": "x", "top_k": "5"}),
    ("/api/v1/generate", {"prompt": "x", "stream": 0}),
    ("/api/v1/generate/stream", {"prompt": "x", "seed": False}),
    ("/api/v1/generate/stream", {"prompt": "x", "temperature": True}),
    ("/api/v1/generate", {"prompt": "x", "max_tokens": 2.5}),
    ("/api/v1/llm/generate/", {"prompt": "x", "parameters": {"seed": False}}),
    ("/api/v1/llm/generate/", {"prompt": "x", "parameters": {"do_sample": 1}}),
    ("/v1/completions", {"prompt": "x", "stream": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": True}),
])
def test_coerced_values_are_refused(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code in (400, 422), r.text
    assert "VALIDATION_ERROR" in r.text


@pytest.mark.parametrize("path,body", [
    ("/api/v1/generate", {"prompt": "a b", "top_k": 3.0, "seed": 7.0, "temperature": 1}),  # JSON integers
    ("/api/v1/generate", {"prompt": "a b", "seed": 9223372036854776000}),  # 2**63 as a double prints it
    ("/api/v1/llm/generate/", {"prompt": "a b", "parameters": {"seed": 2**70, "max_length": 4.0}}),
    ("/v1/completions", {"prompt": "a b", "seed": -(2**64)}),
])
def test_json_integers_and_any_seed_are_taken(client, path, body):
    assert client.post(path, json=body).status_code == 200


def test_batch_item_without_prompt_is_a_422_naming_it(client):
    r = client.post("/api/v1/batch/generate", json={"requests": [{"prompt": "a"}, {"prompt": "b"}, {"seed": 1}]})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and error["message"].startswith("requests.2.prompt")
    assert error["details"][0]["param"] == "requests.2.prompt"


def test_openai_schema_lists_only_what_is_served(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    message = schemas["ChatRequestMessage"]
    assert message["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"type": "integer", "const": 1} in chat["n"]["anyOf"]
    assert {"type": "array", "maxItems": 0} in chat["tools"]["anyOf"]
    load = schemas["LoadRequest"]["properties"]["quantization"]
    assert load["enum"] == [None, "none", "int8", "q8_0", "int8_weight_only", "int4", "q4_0", "q4_1", "int4_weight_only"]
    # ... and the server refuses what the schema leaves out, with a 400 in OpenAI's shape
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "UNSUPPORTED_PARAMETER"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "system"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "MISSING_CONTENT"
    r = client.post("/v1/completions", json={"prompt": ""})
    assert r.status_code == 400
