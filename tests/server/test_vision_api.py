"""HTTP layer of the vision core (seed 003) against the fake adapter, in-process."""
from __future__ import annotations

import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.app import create_app
from tests.conftest import fake_settings


def png(w=40, h=30, color="white") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def client_for(tmp_path, models=None, **overrides) -> TestClient:
    settings = fake_settings(tmp_path, models or {"fast": {}}, **overrides)
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path, fake_kind):
    with client_for(tmp_path, {"fast": {}, "other": {}, "absent": {"installed": False}},
                    defaults={"ocr": ["absent", "fast", "other"], "chat": ["absent", "fast"]}) as c:
        yield c


def assert_clean_error(body: dict, code: str) -> None:
    assert body["code"] == code and isinstance(body["detail"], str)
    text = json.dumps(body)
    assert "Traceback" not in text and "/secret" not in text and "0x7f" not in text


def test_root_and_health(client):
    assert client.get("/").json() == {"message": "ChatVLMLLM API", "version": "1.0.0",
                                      "docs": "/docs", "health": "/health"}
    h = client.get("/health").json()
    assert h["status"] == "healthy" and h["model_loaded"] is False and h["loaded_models"] == []
    assert {"gpu_available", "gpu_name", "device", "memory_usage", "active_connections", "models_loaded"} <= set(h)


def test_models_lists_install_state(client):
    body = client.get("/models").json()
    by_id = {m["id"]: m for m in body["available"]}
    assert by_id["fast"]["installed"] is True and by_id["fast"]["reason"] is None
    assert by_id["absent"]["installed"] is False and "no weights" in by_id["absent"]["reason"]
    assert body["loaded"] == []
    assert {m["name"] for m in body["models"]} == {"fast", "other", "absent"}


def test_ocr_default_model_and_form_or_query_params(client):
    r = client.post("/ocr", files={"file": ("a.png", png(40, 30))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fast" and body["text"] == "fast 40x30" and body["image_size"] == [40, 30]
    assert body["blocks"][0]["box"] == [0, 0, 40, 30]
    r = client.post("/ocr", files={"file": ("a.png", png())}, data={"model": "other", "language": "Russian"})
    assert r.json()["model"] == "other" and r.json()["language"] == "Russian"
    r = client.post("/ocr", files={"file": ("a.png", png())}, params={"model": "other", "language": "en"})
    assert r.json()["model"] == "other" and r.json()["text"].endswith(" en")
    assert client.get("/models").json()["loaded"] == ["fast", "other"]


def test_ocr_errors(client):
    r = client.post("/ocr", files={"file": ("a.png", png())}, data={"model": "nope"})
    assert r.status_code == 404
    assert_clean_error(r.json(), "MODEL_NOT_FOUND")
    assert r.json()["detail"] == "Model 'nope' not found"
    r = client.post("/chat", files={"file": ("a.png", png())}, data={"model": "absent"})
    assert r.status_code == 503  # chat never falls back: an answer from another model is not the one asked for
    assert_clean_error(r.json(), "MODEL_NOT_INSTALLED")
    assert "Adding model weights" in r.json()["detail"]
    r = client.post("/ocr", files={"file": ("a.gif", b"GIF89a" + b"\0" * 50)})
    assert r.status_code == 415
    assert_clean_error(r.json(), "UNSUPPORTED_IMAGE_FORMAT")
    r = client.post("/ocr", files={"file": ("a.png", b"")})
    assert r.status_code == 400
    r = client.post("/ocr", files={"file": ("a.png", png()[:40])})
    assert r.status_code == 400
    assert_clean_error(r.json(), "INVALID_IMAGE")
    r = client.post("/ocr", files={"model": (None, "fast")})  # multipart without the file part
    assert r.status_code == 422 and r.json()["code"] == "VALIDATION_ERROR" and r.json()["param"] == "file"


@pytest.mark.parametrize("path", ["/ocr", "/ocr/annotate", "/chat", "/batch/ocr"])
@pytest.mark.parametrize("kwargs, named", [
    ({"data": {"model": "fast"}}, "application/x-www-form-urlencoded"),
    ({"json": {"file": "aGVsbG8="}}, "application/json"),
    ({"content": b"\x89PNG rest of the bytes"}, "without a Content-Type"),
])
def test_upload_routes_take_multipart_only(client, path, kwargs, named):
    r = client.post(path, **kwargs)
    assert r.status_code == 415 and named in r.json()["detail"]
    assert_clean_error(r.json(), "MULTIPART_REQUIRED")


def test_multipart_part_caps(client):
    two = [("file", ("a.png", png())), ("file", ("b.png", png()))]
    r = client.post("/ocr", files=two)
    assert r.status_code == 400 and r.json()["code"] == "TOO_MANY_FILES"
    fields = [("file", ("a.png", png()))] + [(f"x{i}", (None, "v")) for i in range(17)]
    r = client.post("/chat", files=fields)
    assert r.status_code == 400 and r.json()["code"] == "TOO_MANY_FIELDS"
    r = client.post("/ocr", files=[("file", ("a.png", png())), ("prompt", (None, "x" * (2 * 1024 * 1024)))])
    assert r.status_code == 400 and r.json()["code"] == "FIELD_TOO_LARGE"


def test_file_size_limits(tmp_path, fake_kind):
    with client_for(tmp_path, limits={"max_file_mb": 0.05}) as c:
        big = png() + b"\0" * 60_000
        r = c.post("/ocr", files={"file": ("a.png", big)})
        assert r.status_code == 413 and r.json()["code"] == "FILE_TOO_LARGE"
        # A body far over the cap is refused from its Content-Length, before it is read.
        r = c.post("/ocr", content=b"x" * 3_000_000,
                   headers={"Content-Type": "multipart/form-data; boundary=zzz"})
        assert r.status_code == 413 and r.json()["code"] == "PAYLOAD_TOO_LARGE"
        # In a batch the oversized file fails alone.
        r = c.post("/batch/ocr", files=[("files", ("ok.png", png())), ("files", ("big.png", big))])
        assert r.status_code == 200
        items = r.json()["results"]
        assert [i["status"] for i in items] == ["success", "error"] and items[1]["code"] == "FILE_TOO_LARGE"


def test_streamed_body_over_cap_without_content_length(tmp_path, fake_kind):
    with client_for(tmp_path, limits={"max_file_mb": 0.05}) as c:
        def chunks():
            yield b"--zzz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
            for _ in range(40):
                yield b"\0" * 65536
        r = c.post("/ocr", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=zzz"})
        assert r.status_code == 413 and r.json()["code"] == "PAYLOAD_TOO_LARGE"


def test_batch_order_errors_and_file_count(client):
    files = [("files", ("a.png", png(10, 10))), ("files", ("bad.png", b"not an image")),
             ("files", ("c.png", png(30, 20)))]
    r = client.post("/batch/ocr", files=files, params={"model": "fast"})
    body = r.json()
    assert r.status_code == 200 and body["total"] == 3 and body["successful"] == 2 and body["failed"] == 1
    assert [i["filename"] for i in body["results"]] == ["a.png", "bad.png", "c.png"]
    assert body["results"][0]["text"] == "fast 10x10" and body["results"][2]["text"] == "fast 30x20"
    assert body["results"][1]["status"] == "error" and body["results"][1]["code"] == "UNSUPPORTED_IMAGE_FORMAT"
    r = client.post("/batch/ocr", files=[("files", (f"{i}.png", png())) for i in range(11)])
    assert r.status_code == 400 and r.json()["code"] == "TOO_MANY_FILES"


def test_chat(client):
    r = client.post("/chat", files={"file": ("a.png", png(20, 10))},
                    data={"prompt": "What is it?", "temperature": "0", "max_tokens": "50"})
    assert r.status_code == 200, r.text
    body = r.json()
    # The fake model echoes its prompt: the image (as the engine received it) and the question.
    assert body["response"] == "[20x10] What is it?" and body["prompt"] == "What is it?"
    assert body["model"] == "fast" and body["finish_reason"] == "stop" and body["image_size"] == [20, 10]
    assert body["usage"] == {"prompt_tokens": 19, "completion_tokens": 20, "total_tokens": 39}
    r = client.post("/chat", files={"file": ("a.png", png())}, data={"max_tokens": "7"})
    assert r.json()["prompt"] == "Describe this image"
    assert r.json()["response"] == "[40x30]" and r.json()["finish_reason"] == "length"
    r = client.post("/chat", files={"file": ("a.png", png())}, data={"temperature": "5"})
    assert r.status_code == 422 and r.json()["param"] == "temperature"
    r = client.post("/chat", files={"file": ("a.png", png())}, data={"max_tokens": "0"})
    assert r.status_code == 422


def test_chat_without_any_installed_vlm(tmp_path, fake_kind):
    with client_for(tmp_path, {"absent": {"installed": False}}) as c:
        r = c.post("/chat", files={"file": ("a.png", png())})
        assert r.status_code == 503 and "Adding model weights" in r.json()["detail"]


def test_deadline_gives_504_and_stops_the_work(tmp_path, fake_kind):
    with client_for(tmp_path, {"slow": {"delay": 10, "step_delay": 0.05}}, limits={"request_timeout_s": 0.5}) as c:
        r = c.post("/ocr", files={"file": ("a.png", png())})
        assert r.status_code == 504 and r.json()["code"] == "DEADLINE_EXCEEDED"
        r = c.post("/batch/ocr", files=[("files", ("a.png", png()))])
        assert r.status_code == 200 and r.json()["results"][0]["code"] == "DEADLINE_EXCEEDED"
        r = c.post("/chat", files={"file": ("a.png", png())}, data={"prompt": "x" * 200, "max_tokens": "500"})
        assert r.status_code == 504 and r.json()["code"] == "DEADLINE_EXCEEDED"
        engine = c.app.state.services.manager.state("slow").engine
        assert engine.active_count == 0 and engine.waiting_count == 0
    assert ("slow", "cancelled") in fake_kind.EVENTS


def test_bug_is_500_without_internals(tmp_path, fake_kind):
    with client_for(tmp_path, {"buggy": {"fail_ocr": True}, "broken": {"fail_load": True}}) as c:
        r = c.post("/ocr", files={"file": ("a.png", png())}, data={"model": "buggy"})
        assert r.status_code == 500
        assert_clean_error(r.json(), "INTERNAL_ERROR")
        r = c.post("/ocr", files={"file": ("a.png", png())}, data={"model": "broken"})
        assert r.status_code == 503 and r.headers.get("Retry-After")
        assert_clean_error(r.json(), "MODEL_LOAD_FAILED")
        assert c.get("/models").json()["available"][1]["status"] == "failed"


def test_load_and_unload(client):
    r = client.post("/models/fast/load")
    assert r.status_code == 200 and r.json()["status"] == "success"
    assert client.get("/health").json()["loaded_models"] == ["fast"]
    r = client.delete("/models/fast")
    assert r.json() == {"status": "success", "message": "Model fast unloaded", "load_time": None, "memory_usage": None}
    assert client.get("/health").json()["model_loaded"] is False
    assert client.delete("/models/nope").status_code == 404
    assert client.post("/models/absent/load").status_code == 503


def test_language_routing(tmp_path, fake_kind):
    models = {"latin": {"unsupported": ["russian"]}, "cyr": {}}
    with client_for(tmp_path, models) as c:
        assert c.post("/ocr", files={"file": ("a.png", png())}).json()["model"] == "latin"
        r = c.post("/ocr", files={"file": ("a.png", png())}, data={"language": "Russian"})
        assert r.json()["model"] == "cyr"
        r = c.post("/ocr", files={"file": ("a.png", png())}, data={"language": "Russian", "model": "latin"})
        assert r.status_code == 400 and r.json()["code"] == "LANGUAGE_NOT_SUPPORTED"


def test_ocr_fallback_is_on_by_default_and_says_so(tmp_path, fake_kind):
    models = {"absent": {"installed": False}, "fast": {}}
    with client_for(tmp_path, models) as c:
        r = c.post("/ocr", files={"file": ("a.png", png())}, data={"model": "absent"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "fast" and body["requested_model"] == "absent"
        assert "not installed" in body["fallback_reason"] and "no weights" in body["fallback_reason"]
        assert r.headers["X-Model-Fallback"].startswith("absent; served-by=fast; reason=")
        # the batch and annotate routes say it too
        r = c.post("/batch/ocr", files=[("files", ("a.png", png()))], params={"model": "absent"})
        assert r.json()["requested_model"] == "absent" and r.json()["model"] == "fast"
        assert "served-by=fast" in r.headers["X-Model-Fallback"]
        r = c.post("/ocr/annotate", files={"file": ("a.png", png())}, data={"model": "absent"})
        assert r.status_code == 200 and "served-by=fast" in r.headers["X-Model-Fallback"]
        # a model that serves itself: no fallback fields, no header
        r = c.post("/ocr", files={"file": ("a.png", png())}, data={"model": "fast"})
        assert r.json()["requested_model"] is None and r.json()["fallback_reason"] is None
        assert "X-Model-Fallback" not in r.headers
        # an unknown model is still 404: only a known model that is not installed falls back
        r = c.post("/ocr", files={"file": ("a.png", png())}, data={"model": "nope"})
        assert r.status_code == 404


def test_ocr_fallback_off_gives_the_503_back(tmp_path, fake_kind):
    models = {"absent": {"installed": False}, "fast": {}}
    with client_for(tmp_path, models, routing={"ocr_fallback": False}) as c:
        r = c.post("/ocr", files={"file": ("a.png", png())}, data={"model": "absent"})
        assert r.status_code == 503 and r.json()["code"] == "MODEL_NOT_INSTALLED"
        assert "X-Model-Fallback" not in r.headers


def test_ocr_fallback_never_covers_a_failed_load(tmp_path, fake_kind):
    models = {"broken": {"fail_load": True}, "fast": {}}
    with client_for(tmp_path, models) as c:
        r = c.post("/ocr", files={"file": ("a.png", png())}, data={"model": "broken"})
        assert r.status_code == 503 and r.json()["code"] == "MODEL_LOAD_FAILED"


def test_openapi_documents_errors(client):
    spec = client.get("/openapi.json").json()
    ocr = spec["paths"]["/ocr"]["post"]
    assert {"200", "400", "404", "413", "415", "422", "503", "504"} <= set(ocr["responses"])
    docs, redoc = client.get("/docs"), client.get("/redoc")
    assert docs.status_code == 200 and redoc.status_code == 200
    # The pages load their assets from this server, not a CDN: they work offline.
    assert "cdn." not in docs.text and "cdn." not in redoc.text
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    assert client.get("/static-offline-docs/redoc.standalone.js").status_code == 200


def test_unknown_route_is_shaped(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"


def test_liveness_and_readiness(tmp_path, fake_kind):
    with client_for(tmp_path, {"fast": {}}) as c:
        assert c.get("/healthz").json() == {"status": "ok", "reason": None}
        assert c.get("/readyz").status_code == 200
        c.app.state.services.draining = True
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "draining"
    with client_for(tmp_path, {"absent": {"installed": False}}) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_ready"
        assert c.get("/healthz").status_code == 200


def test_file_part_without_filename_is_a_file(client):
    """RFC 7578 makes the filename optional (aiohttp's FormData sends bytes without one): a part
    with a non-text Content-Type is read as a file, its bytes intact."""
    boundary = "b0undary"
    parts = [png(24, 12), png(30, 10)]
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"\r\n"
                    f"Content-Type: image/png\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nfast\r\n--{boundary}--\r\n".encode()
    r = client.post("/batch/ocr", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    assert [i["text"] for i in r.json()["results"]] == ["fast 24x12", "fast 30x10"]
    # a text part stays a field
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\nContent-Type: text/plain\r\n\r\n"
            f"hello\r\n--{boundary}--\r\n").encode()
    r = client.post("/ocr", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 422 and r.json()["param"] == "file"


@pytest.mark.parametrize("data,status", [(b"", 400), (b"plain text, not pixels", 415), (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 400)])
def test_chat_with_a_bad_image_answers_before_any_model_loads(client, data, status):
    r = client.post("/chat", files={"file": ("a.png", data)})
    assert r.status_code == status, r.text
    assert client.get("/models").json()["loaded"] == []
