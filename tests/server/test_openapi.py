"""/openapi.json declares what the middleware and the parsers can answer, on every operation."""
from __future__ import annotations

from core.config import load_settings
from server.app import create_app
from server.auth import PROBE_PATHS

from tests.conftest import ROOT


def schema(**overrides) -> dict:
    settings = load_settings(ROOT / "config.yaml", **overrides)
    return create_app(settings).openapi()


def operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method, op


def test_every_operation_declares_auth_rate_limit_and_body_errors():
    doc = schema()
    seen = 0
    for path, method, op in operations(doc):
        seen += 1
        responses = op["responses"]
        if path not in PROBE_PATHS:
            assert {"401", "429"} <= set(responses), (method, path)
            assert "Retry-After" in responses["429"]["headers"]
        if "requestBody" in op:
            assert {"400", "413"} <= set(responses) or path in PROBE_PATHS, (method, path)
        if "503" in responses and path not in PROBE_PATHS:  # /readyz's 503 is a probe answer
            assert "Retry-After" in responses["503"]["headers"], (method, path)
        if path.startswith("/v1/"):
            assert "422" not in responses  # the OpenAI surface answers validation errors with 400
        # each surface's own error shape
        ref = responses.get("401", {}).get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
        if path.startswith("/v1/"):
            assert ref.endswith("/OpenAIError")
        elif path.startswith("/api/v1/llm/"):
            assert ref.endswith("/LlmError")
        elif path.startswith("/api/v1/"):
            assert ref.endswith("/SpecError")
        elif path.startswith("/api/"):  # the management surface (seed 004): timestamp and path too
            assert ref.endswith("/ManagementError")
        elif path not in PROBE_PATHS:
            assert ref.endswith("/ErrorDetail")
    assert seen >= 30


def test_rate_limit_headers_are_declared_when_limits_are_on():
    off = schema()
    assert "X-RateLimit-Limit" not in off["paths"]["/ocr"]["post"]["responses"]["200"].get("headers", {})
    on = schema(rate_limit={"requests_per_minute": 10})
    for path, method, op in operations(on):
        if path not in PROBE_PATHS:
            for status, answer in op["responses"].items():
                assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(answer["headers"])


def test_upload_parts_follow_the_configured_limits():
    doc = schema(limits={"allowed_formats": ["PNG", "PDF"], "max_batch_files": 4, "max_file_mb": 2})
    comps = doc["components"]["schemas"]
    batch = doc["paths"]["/batch/ocr"]["post"]["requestBody"]["content"]["multipart/form-data"]
    files = comps[batch["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"]["files"]
    assert files["minItems"] == 1 and files["maxItems"] == 4
    assert files["items"]["minLength"] == 1 and files["items"]["maxLength"] == 2 * 1024 * 1024
    assert batch["encoding"]["files"]["contentType"] == "image/png, application/pdf"
    chat = doc["paths"]["/chat"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert chat["encoding"]["file"]["contentType"] == "image/png"  # no PDF for chat
    body = comps[chat["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert all("anyOf" not in p or {"type": "null"} not in p["anyOf"] for p in body.values())  # no nulls in multipart
