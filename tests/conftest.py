"""Shared fixtures: tiny random-weight checkpoints built once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _tesseract_missing() -> str | None:
    """Why the configured Tesseract cannot run here (None when it can): the tests that need it
    are skipped with this reason on a machine without it (scripts/system_deps.sh installs it)."""
    from core.config import load_settings
    from models.registry import ModelRegistry

    state = ModelRegistry(load_settings(ROOT / "config.yaml")).get("tesseract").install_state()
    return None if state.installed else f"Tesseract is not installed ({state.reason}): " \
        "apt-get install tesseract-ocr tesseract-ocr-rus tesseract-ocr-chi-sim"


def pytest_sessionstart(session) -> None:
    """Build the compiled decode step (engine/native_step.py) before any test runs: servers and
    engines started by the tests then load it at once, instead of a build in the background
    competing for the two cores with timing-sensitive tests."""
    from engine import native_step

    if not native_step.wait(600):
        print(f"\nnote: the compiled decode step is unavailable ({native_step.error()}); the Python step runs")


TESSERACT_MISSING = _tesseract_missing()
requires_tesseract = pytest.mark.skipif(TESSERACT_MISSING is not None, reason=TESSERACT_MISSING or "")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """A models_dir holding tiny checkpoints under the registry ids (see scripts/make_tiny_models.py)."""
    from scripts.make_tiny_models import build_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    build_tiny_models(out)
    return out


@pytest.fixture
def fake_kind(monkeypatch):
    """Register the deterministic fake adapter as kind 'fake' for one test."""
    from core.types import Capability
    from models import adapter, registry
    from tests import fakes

    monkeypatch.setitem(adapter.ADAPTER_KINDS, "fake", "tests.fakes:FakeAdapter")
    monkeypatch.setitem(registry.KIND_CAPABILITIES, "fake", frozenset({Capability.OCR, Capability.CHAT}))
    fakes.EVENTS.clear()
    return fakes


def fake_settings(tmp_path, models: dict, **overrides):
    """Settings with only the given fake models (id -> options) and no config file."""
    from core.config import load_settings

    cfg = {mid: {"name": mid, "kind": "fake", "options": opts} for mid, opts in models.items()}
    ids = list(models)
    overrides.setdefault("defaults", {"ocr": ids, "chat": ids})
    return load_settings(ROOT / "tests" / "empty.yaml", models=cfg, models_dir=tmp_path / "weights",
                         data_dir=tmp_path / "data", **overrides)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throw-away PostgreSQL cluster for the session (skipped when PostgreSQL is not installed)."""
    from tests.postgres import PostgresCluster, pg_bin

    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; scripts/system_deps.sh test)")
    cluster = PostgresCluster(bin_dir)
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """Persistence tests run on both backends: a fresh database each."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'chatvlm.db'}"
    return request.getfixturevalue("postgres_cluster").new_database()


@pytest.fixture(scope="session")
def redis_server():
    """A throw-away Redis server for the session (skipped when redis-server is not installed)."""
    from tests.redis_server import RedisServer, redis_bin

    binary = redis_bin()
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; scripts/system_deps.sh test)")
    server = RedisServer(binary)
    yield server
    server.stop()
