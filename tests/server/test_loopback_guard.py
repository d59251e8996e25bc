"""With no API keys, only this machine is served, whatever launched the app: in-process with a
remote client address, and end to end with ``uvicorn api:app --host 0.0.0.0`` reached over a
non-loopback address of this machine."""
from __future__ import annotations

import asyncio

import httpx
import psutil
import pytest
import requests

from server.app import create_app
from server.auth import is_remote
from tests.conftest import fake_settings
from tests.e2e.management_api import ADMIN_PASSWORD
from tests.server_process import RemoteServer


def _get(app, path: str, client: tuple[str, int], **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.get(path, **kw)
    return asyncio.run(go())


def test_is_remote():
    assert is_remote(("10.0.0.5", 1)) and is_remote(("2001:db8::1", 1)) and is_remote(("192.0.2.2", 1))
    assert not is_remote(("127.0.0.1", 1)) and not is_remote(("::1", 1)) and not is_remote(("127.8.9.1", 1))
    assert not is_remote(None) and not is_remote(("testclient", 50000))


def test_remote_clients_get_401_without_keys(tmp_path, fake_kind):
    app = create_app(fake_settings(tmp_path, {"fast": {}}))
    r = _get(app, "/models", ("10.1.2.3", 5555))
    assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED" and "api_keys" in r.json()["detail"]
    r = _get(app, "/v1/models", ("10.1.2.3", 5555))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert _get(app, "/health", ("10.1.2.3", 5555)).status_code == 200  # probes stay open
    assert _get(app, "/models", ("127.0.0.1", 5555)).status_code == 200
    assert _get(app, "/models", ("::1", 5555)).status_code == 200


def test_allow_unauthenticated_public_turns_the_guard_off(tmp_path, fake_kind):
    app = create_app(fake_settings(tmp_path, {"fast": {}}, server={"allow_unauthenticated_public": True}))
    assert _get(app, "/models", ("10.1.2.3", 5555)).status_code == 200


def _non_loopback_ipv4() -> str | None:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None


def test_uvicorn_on_all_interfaces_refuses_remote_clients(tmp_path):
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call itself from")
    env = {"CHATVLM_ADMIN_PASSWORD": ADMIN_PASSWORD, "CHATVLM_API_KEYS": ""}
    with RemoteServer(models_dir=tmp_path, env=env, launcher="uvicorn", host="0.0.0.0") as srv:
        remote = f"http://{address}:{srv.port}"
        r = requests.get(remote + "/models", timeout=30)
        assert r.status_code == 401 and "api_keys" in r.json()["detail"]
        assert requests.get(remote + "/v1/models", timeout=30).status_code == 401
        assert requests.get(srv.url + "/models", timeout=30).status_code == 200  # loopback as before
        assert requests.get(remote + "/health", timeout=30).status_code == 200
        # a management token is authentication: the login is open, the token is accepted
        r = requests.post(remote + "/api/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD})
        assert r.status_code == 200
        auth = {"Authorization": "Bearer " + r.json()["access_token"]}
        assert requests.get(remote + "/models", headers=auth, timeout=30).status_code == 200
        assert requests.get(remote + "/api/models", headers=auth, timeout=30).status_code == 200
