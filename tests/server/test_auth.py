"""API-key auth over every route and WebSocket, in-process, and with the openai SDK end to end."""
from __future__ import annotations

import re

import pytest
from fastapi.routing import APIWebSocketRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount
from starlette.testclient import WebSocketDenialResponse

from server.app import create_app
from tests.conftest import fake_settings

KEY, OTHER = "k1-secret", "k2-secret"
OPEN = {"/health", "/healthz", "/readyz", "/ui/app.js"}  # /ui/...: the playground's static files
LOGIN = "/api/auth/token"  # the management login: how a client without a key gets a token
DOCS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def make_client(tmp_path, **auth) -> TestClient:
    settings = fake_settings(tmp_path, {"fast": {}}, auth={"api_keys": [KEY, OTHER], **auth})
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path, fake_kind):
    with make_client(tmp_path) as c:
        yield c


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def all_routes(app) -> list:
    """Every route with its full template (FastAPI keeps included routers lazy in app.routes)."""
    from fastapi.routing import iter_route_contexts

    return [(getattr(c, "original_route", c), c.path_format) for c in iter_route_contexts(app.routes)]


def http_routes(app) -> list[tuple[str, str]]:
    out = []
    for route, template in all_routes(app):
        if isinstance(route, Mount):
            asset = "/app.js" if template.startswith("/ui/") else "/swagger-ui.css"
            out.append(("GET", concrete(template).replace("/x", asset)))
        elif not isinstance(route, APIWebSocketRoute):
            out += [(m, concrete(template)) for m in sorted(route.methods) if m != "HEAD"]
    return out


def ws_routes(app) -> list[str]:
    return [concrete(t) for r, t in all_routes(app) if isinstance(r, APIWebSocketRoute)]


def test_every_route_needs_a_key(client):
    routes = http_routes(client.app)
    assert {"/v1/chat/completions", "/api/v1/llm/generate/", "/api/v1/generate", "/generate", "/metrics",
            "/ocr", "/models"} <= {p for _, p in routes}
    guarded = [(m, p) for m, p in routes if p not in OPEN and p != LOGIN]
    refused = [(m, p) for m, p in guarded if client.request(m, p).status_code == 401]
    assert refused == guarded  # 100% of guarded routes: 401 without a key
    for method, path in guarded:
        r = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code != 401, (method, path, r.text)
    for path in OPEN:
        assert client.get(path).status_code in (200, 503)
    assert client.post(LOGIN, json={}).status_code == 422  # reached the route: no key needed
    print(f"\nauth: {len(refused)}/{len(guarded)} guarded HTTP routes answered 401 without a key")


def test_every_websocket_needs_a_key(client):
    paths = ws_routes(client.app)
    assert "/ws/chat/x/" in paths
    for path in paths:
        with pytest.raises(WebSocketDenialResponse) as denied:
            with client.websocket_connect(path):
                pass
        assert denied.value.status_code == 401
        assert denied.value.headers["www-authenticate"].startswith("Bearer")
        body = denied.value.json()  # in the surface's error shape (/ws/monitor: the management one)
        code = body["code"] if "code" in body else body["error"]["code"]
        assert code == ("AUTHENTICATION_FAILED" if path == "/ws/monitor" else "UNAUTHORIZED"), body
        with client.websocket_connect(path, headers={"X-API-Key": KEY}) as ws:
            ws.close()


def test_both_header_forms_and_wrong_key(client):
    assert client.get("/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/models", headers={"authorization": f"bearer {OTHER}"}).status_code == 200
    assert client.get("/models", headers={"X-API-Key": KEY}).status_code == 200
    for headers in ({"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": "Bearer "}, {"X-API-Key": KEY + "x"}):
        r = client.get("/models", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_host_header_and_path_tricks_do_not_bypass(client):
    for path in ("/health/", "/health/../models", "//health", "/healthz/x", "/static-offline-docs/../ocr"):
        assert client.get(path, headers={"Host": "localhost"}).status_code == 401, path
    assert client.get("/models", headers={"Host": "127.0.0.1"}).status_code == 401


def test_error_shape_per_surface(client):
    r = client.post("/v1/chat/completions", json={})
    err = r.json()["error"]
    assert r.status_code == 401 and err["type"] == "authentication_error" and err["code"] == "UNAUTHORIZED"
    assert set(err) == {"message", "type", "param", "code"}
    body = client.post("/api/v1/llm/generate/", json={}).json()
    assert isinstance(body["error"], str) and body["code"] == "UNAUTHORIZED"
    body = client.post("/api/v1/generate", json={}).json()
    assert body["error"]["code"] == "UNAUTHORIZED" and isinstance(body["error"]["message"], str)
    body = client.post("/ocr").json()
    assert isinstance(body["detail"], str) and body["code"] == "UNAUTHORIZED"
    assert KEY not in client.get("/models", headers={"X-API-Key": "nope"}).text


def test_docs_are_private_unless_configured(client, tmp_path):
    for path in DOCS:
        assert client.get(path).status_code == 401, path
    with make_client(tmp_path, public_docs=True) as public:
        for path in DOCS:
            assert public.get(path).status_code == 200, path
        assert public.get("/static-offline-docs/swagger-ui.css").status_code == 200
        assert public.get("/models").status_code == 401


def test_no_keys_means_auth_off(tmp_path, fake_kind):
    with TestClient(create_app(fake_settings(tmp_path, {"fast": {}}))) as c:
        assert c.get("/models").status_code == 200


def test_settings_keep_only_digests(tmp_path):
    s = fake_settings(tmp_path, {"fast": {}}, auth={"api_keys": [KEY]})
    assert s.auth.api_keys == [] and KEY not in repr(s) and len(s.auth.api_key_sha256) == 1


def test_comma_separated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATVLM_API_KEYS", "a1, b2")
    assert len(fake_settings(tmp_path, {"fast": {}}).auth.api_key_sha256) == 2


def test_refuses_public_bind_without_keys(tmp_path, capsys):
    import api

    base = tmp_path / "c.yaml"
    base.write_text("server: {host: 0.0.0.0}\ndefaults: {ocr: [], chat: [], text: []}\n")
    assert api.main(["--config", str(base)]) == 2
    assert "refusing to serve 0.0.0.0" in capsys.readouterr().err
    from core.config import load_settings

    assert api._public_bind_refusal(load_settings(base, auth={"api_keys": ["x"]})) is None
    assert api._public_bind_refusal(load_settings(base, server={"host": "0.0.0.0",
                                                                "allow_unauthenticated_public": True})) is None
    assert api._public_bind_refusal(load_settings(base, server={"host": "::1"})) is None


def test_openai_sdk_end_to_end():
    import openai

    from tests.server_process import RemoteServer

    with RemoteServer(config=None, env={"CHATVLM_AUTH__API_KEYS": '["k1"]'}) as server:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=server.url + "/v1", api_key="k1", max_retries=0).models.list()
        assert models.object == "list"
        # What a `websockets` client sees: the handshake refused with HTTP 401, then success with a key.
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        with pytest.raises(InvalidStatus) as refused:
            connect(server.ws_url + "/ws/chat/s1/", open_timeout=5)
        assert refused.value.response.status_code == 401
        with connect(server.ws_url + "/ws/chat/s1/", additional_headers={"Authorization": "Bearer k1"},
                     open_timeout=5) as ws:
            ws.close()


def test_websocket_key_in_token_query(client):
    """Browsers cannot set headers on a WebSocket: ?token= carries the key there (and only there)."""
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect("/ws/chat/s1/?token=nope"):
            pass
    assert denied.value.status_code == 401
    with client.websocket_connect(f"/ws/chat/s1/?token={KEY}") as ws:
        ws.close()
    assert client.get(f"/models?token={KEY}").status_code == 401  # HTTP keeps keys out of URLs (and logs)


def test_playground_page_loads_without_a_key_but_its_calls_need_one(client):
    page = client.get("/ui/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("app.js", "style.css", "markdown.js"):
        assert client.get(f"/ui/{asset}").status_code == 200
    assert client.get("/ui/../models").status_code in (401, 404)  # no way out of the static folder
    assert client.get("/ui/nothing-here").status_code == 404
    r = client.post("/pages/render")
    assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED"
