"""Users and tokens end to end, on SQLite and PostgreSQL: login, expiry, tampered tokens and
`alg: none`, roles, throttling, the first admin's password, and API keys beside tokens."""
from __future__ import annotations

import base64
import json
import os
import stat
import time

import jwt
import pytest
import requests

from tests.e2e.management_api import ADMIN_PASSWORD, Api, assert_seed_error, backend_env, token
from tests.server_process import RemoteServer


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    env = {"CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD, **backend_env(request)}
    with RemoteServer(models_dir=tmp_path_factory.mktemp("weights"), env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def admin(server):
    return Api(server.url)


def _b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_login_answers_the_seed_shape_and_the_token_works(server, admin):
    r = requests.post(server.url + "/api/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD})
    body = r.json()
    assert r.status_code == 200 and set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "admin" and claims["exp"] - claims["iat"] == 3600
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS256"
    assert admin.get("/api/users/me").json()["role"] == "admin"


def test_every_management_route_needs_a_token(server):
    for method, path in (("GET", "/api/models"), ("POST", "/api/models"), ("GET", "/api/models/x"),
                         ("GET", "/api/tasks/x"), ("GET", "/api/users"), ("GET", "/api/models/x/logs")):
        r = requests.request(method, server.url + path, json={} if method == "POST" else None)
        assert_seed_error(r, 401, "AUTHENTICATION_FAILED", path)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_bad_credentials_and_bad_tokens_all_look_the_same(server):
    def login(user, pw):
        return requests.post(server.url + "/api/auth/token", json={"username": user, "password": pw})

    wrong, unknown = login("admin", "not-the-password"), login("nobody-here", "whatever-1")
    assert_seed_error(wrong, 401, "AUTHENTICATION_FAILED")
    assert_seed_error(unknown, 401, "AUTHENTICATION_FAILED")
    assert wrong.json()["error"]["message"] == unknown.json()["error"]["message"]

    secret = (server.data_dir / "jwt_secret").read_text().strip()
    now = int(time.time())
    good = {"sub": "admin", "iss": "chatvlm", "iat": now, "exp": now + 600}
    expired = jwt.encode({**good, "iat": now - 7200, "exp": now - 3600}, secret, algorithm="HS256")
    wrong_key = jwt.encode(good, "x" * 48, algorithm="HS256")
    valid = jwt.encode(good, secret, algorithm="HS256")
    head, payload, sig = valid.split(".")
    tampered = ".".join([head, _b64({**good, "sub": "someone-else"}), sig])
    alg_none = ".".join([_b64({"alg": "none", "typ": "JWT"}), _b64(good), ""])
    no_exp = jwt.encode({k: v for k, v in good.items() if k != "exp"}, secret, algorithm="HS256")
    messages = set()
    for bad in (expired, wrong_key, tampered, alg_none, no_exp, "garbage", valid + "x"):
        r = requests.get(server.url + "/api/models", headers={"Authorization": f"Bearer {bad}"})
        messages.add(assert_seed_error(r, 401, "AUTHENTICATION_FAILED")["error"]["message"])
    assert len(messages) == 1
    ok = requests.get(server.url + "/api/models", headers={"Authorization": f"Bearer {valid}"})
    assert ok.status_code == 200


def test_secrets_are_private_files(server):
    mode = stat.S_IMODE(os.stat(server.data_dir / "jwt_secret").st_mode)
    assert mode == 0o600
    assert not (server.data_dir / "initial_admin_password").exists()  # the password was configured


def test_roles(server, admin):
    r = admin.post("/api/users", json={"username": "reader", "password": "reader-pass-1", "role": "user"})
    assert r.status_code == 201 and r.json()["role"] == "user"
    assert_seed_error(admin.post("/api/users", json={"username": "reader", "password": "another-pass"}),
                      409, "USER_ALREADY_EXISTS")
    reader = Api(server.url, username="reader", password="reader-pass-1")
    assert reader.get("/api/models").status_code == 200
    assert reader.get("/api/users/me").json() == {**reader.get("/api/users/me").json(), "role": "user"}
    for method, path, body in (("POST", "/api/models", {"name": "x", "framework": "rapidocr"}),
                               ("POST", "/api/models/rapidocr/start", None),
                               ("POST", "/api/models/rapidocr/stop", None),
                               ("DELETE", "/api/models/rapidocr", None),
                               ("GET", "/api/users", None),
                               ("POST", "/api/users", {"username": "y", "password": "pppppppp1"}),
                               ("DELETE", "/api/users/admin", None)):
        assert_seed_error(reader.call(method, path, json=body), 403, "AUTHORIZATION_FAILED", path)
    # a user changes their own password; the old one stops working
    r = reader.put("/api/users/me/password", json={"current_password": "reader-pass-1",
                                                   "new_password": "reader-pass-2"})
    assert r.status_code == 200
    token(server.url, "reader", "reader-pass-2")
    # a deleted user's token stops working at once
    assert admin.delete("/api/users/reader").status_code == 200
    assert_seed_error(reader.get("/api/models"), 401, "AUTHENTICATION_FAILED")
    assert_seed_error(admin.delete("/api/users/admin"), 409, "CANNOT_DELETE_SELF")
    assert_seed_error(admin.delete("/api/users/ghost"), 404, "USER_NOT_FOUND")


def test_user_input_is_validated(admin):
    for body in ({"username": "Bad Name", "password": "pppppppp1"}, {"username": "ok", "password": "short"},
                 {"username": "ok", "password": "pppppppp1", "role": "root"},
                 {"username": "ok", "password": "pppppppp1", "extra": 1}, {"username": 5, "password": "pppppppp1"}):
        assert_seed_error(admin.post("/api/users", json=body), 422, "INVALID_REQUEST")
    r = admin.post("/api/users", data="{not json", headers={"Content-Type": "application/json"})
    assert_seed_error(r, 400, "INVALID_REQUEST")


def test_failed_logins_are_throttled_per_user(server, admin):
    assert admin.post("/api/users", json={"username": "victim", "password": "victim-pass-1"}).status_code == 201
    for _ in range(5):
        r = requests.post(server.url + "/api/auth/token", json={"username": "victim", "password": "guess-guess"})
        assert r.status_code == 401
    r = requests.post(server.url + "/api/auth/token", json={"username": "victim", "password": "victim-pass-1"})
    assert_seed_error(r, 429, "RATE_LIMITED")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    token(server.url)  # another user is not locked out


def test_generated_admin_password(tmp_path):
    """No password configured: one is generated into <data_dir>/initial_admin_password (0600) and logged."""
    data = tmp_path / "data"
    env = {"CHATVLM_ADMIN_PASSWORD": "", "CHATVLM_SERVER__LOG_LEVEL": "info"}
    with RemoteServer(models_dir=tmp_path, data_dir=data, env=env) as srv:
        path = data / "initial_admin_password"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        password = path.read_text().strip()
        assert len(password) >= 16
        token(srv.url, "admin", password)
        assert "initial_admin_password" in srv.logs() and password not in srv.logs()


def test_api_keys_and_tokens_work_on_every_surface(tmp_path):
    env = {"CHATVLM_API_KEYS": "key-one", "CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD}
    with RemoteServer(models_dir=tmp_path, env=env) as srv:
        jwt_token = token(srv.url)  # the login needs no key
        for path in ("/models", "/v1/models", "/api/v1/models", "/api/models"):
            assert requests.get(srv.url + path).status_code == 401
            assert requests.get(srv.url + path, headers={"Authorization": f"Bearer {jwt_token}"}).status_code == 200
            assert requests.get(srv.url + path, headers={"Authorization": "Bearer key-one"}).status_code == 200
        # a configured key is an admin on the management surface
        r = requests.post(srv.url + "/api/models", headers={"X-API-Key": "key-one"},
                          json={"name": "ocr-by-key", "framework": "rapidocr"})
        assert r.status_code == 201, r.text
