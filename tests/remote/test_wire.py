"""The wire format of the remote engine: pure functions, no server."""
from __future__ import annotations

import pytest
from PIL import Image
from pydantic import ValidationError

from core.config import ModelConfig
from core.types import GenerationParams
from llm.types import ChatMessage, ImagePart
from remote import wire


def test_remote_messages_are_cleaned_of_internals():
    raw = ('Traceback (most recent call last):\n  File "/srv/app/x.py", line 3\nKeyError at 0x7f3a2b1c4d50 '
           'model /models/qwen/weights.bin on http://10.1.2.3:8000/v1 (10.1.2.3:8000)')
    cleaned = wire.clean("Model failed. " + raw)
    assert cleaned == "Model failed."
    msg = wire.clean("bad max_tokens for /data/m/x.gguf at 0xdeadbeef00 via 192.168.0.4:80 " + "x" * 400)
    assert "/data" not in msg and "0xdead" not in msg and "192.168" not in msg and len(msg) <= wire.MAX_MESSAGE_CHARS
    assert wire.error_from_body(b'{"error": {"message": "Model \'m\' not found", "type": "x"}}') == "Model 'm' not found"
    assert wire.error_from_body(b'{"detail": [{"msg": "field required"}]}') == "field required"
    assert wire.error_from_body(b"Internal Server Error") == "Internal Server Error"


def test_stream_events():
    chunk = wire.parse_event('{"choices":[{"delta":{"content":"Hi"},"index":0,"finish_reason":null}]}')
    assert chunk.text == "Hi" and chunk.finish_reason is None
    end = wire.parse_event('{"choices":[{"delta":{},"finish_reason":"length"}],"usage":{"prompt_tokens":7,'
                           '"completion_tokens":3}}')
    assert end.finish_reason == "length" and end.usage == (7, 3)
    assert wire.parse_event('{"choices":[{"text":"ab","finish_reason":"eos"}]}').finish_reason == "stop"
    assert wire.parse_event("[DONE]") is None
    assert wire.parse_event('{"error":{"message":"boom at /x/y/z"}}').error == "boom at <path>"
    with pytest.raises(ValueError):
        wire.parse_event("not json")


def test_requests_and_counting():
    image = Image.new("RGB", (8, 8), "red")
    p = wire.encode([ChatMessage("user", (ImagePart(image), "read it"))], None)
    part = p.body["messages"][0]["content"][0]
    assert p.path == "/v1/chat/completions" and part["image_url"]["url"].startswith("data:image/png;base64,")
    assert wire.encode(None, "Once").path == "/v1/completions"
    params = GenerationParams(max_new_tokens=5, top_k=4, ignore_eos=True, stop=("\n",))
    assert "top_k" not in wire.sampling(params, "openai")
    assert wire.sampling(params, "vllm")["ignore_eos"] is True and wire.sampling(params, "vllm")["stop"] == ["\n"]
    assert wire.count_tokens("Hello, world!") == 4


def test_remote_settings_validate():
    cfg = ModelConfig(name="r", kind="remote", framework="vllm",
                      remote={"base_url": "http://gpu1:8000/v1/", "api_key": "sk-1"}).remote
    assert cfg.base_url == ["http://gpu1:8000"] and "sk-1" not in repr(cfg)
    with pytest.raises(ValidationError):
        ModelConfig(name="r", kind="remote", remote={"base_url": ["file:///etc/passwd"]})
    with pytest.raises(ValidationError):
        ModelConfig(name="r", kind="remote")  # no remote section
