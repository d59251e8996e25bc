"""Every SSE event of the real server on the tiny text checkpoint (pieces, end markers, usage
chunks) matches the event schema the route declares in /openapi.json."""
from __future__ import annotations

import httpx
import pytest

from tests.server.test_stream_schemas import check_stream

TEXT = "qwen2_5_0_5b"
COMMON = {"model": TEXT, "max_tokens": 12, "temperature": 0.8, "seed": 3}


@pytest.mark.parametrize("path,body", [
    ("/generate", {"prompt": "Привет\nмир", **COMMON}),
    ("/api/v1/generate", {"prompt": "你好", "stream": True, **COMMON}),
    ("/api/v1/generate/stream", {"prompt": "hello", "stop": ["zz"], **COMMON}),
    ("/api/v1/llm/generate/stream/", {"prompt": "hello", "model": TEXT, "parameters": {"max_length": 12, "seed": 3}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "stream_options": {"include_usage": True}, **COMMON}),
    ("/v1/completions", {"prompt": "Once", "stream": True, **COMMON}),
])
def test_real_stream_events_match_the_declared_schema(tiny_server, path, body):
    openapi = httpx.get(tiny_server.url + "/openapi.json", timeout=30).json()
    r = httpx.post(tiny_server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert len(check_stream(openapi, path, r.text)) >= 2
