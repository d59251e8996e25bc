"""The hostile-upload corpus (scripts/hostile_uploads.py) against POST /jobs/ocr on a real server:
every case answers 202 or 4xx (429 once the client has its fill of unfinished jobs), never 5xx,
never a hang, and the server is still healthy afterwards."""
from __future__ import annotations

import pytest

from scripts.hostile_uploads import acceptable, build_jobs_corpus, healthy, send_raw
from tests.server_process import RemoteServer

TIMEOUT_S = 20.0
CASES = build_jobs_corpus(quick=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"CHATVLM_DATA_DIR": str(tmp_path_factory.mktemp("jobs_hostile"))}
    with RemoteServer(models_dir=tmp_path_factory.mktemp("nw"), env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def results(server):
    return {c.name: send_raw("127.0.0.1", server.port, c, TIMEOUT_S) for c in CASES}


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_case_answers_202_or_4xx(results, name):
    r = results[name]
    assert acceptable(r), f"{r.path} {name}: status={r.status} error={r.error} latency={r.latency}s"
    assert r.latency < TIMEOUT_S


def test_server_healthy_afterwards(server, results):
    assert len(results) == len(CASES) > 20
    assert any(r.status == 202 for r in results.values())  # the good uploads became jobs
    assert healthy("127.0.0.1", server.port)
    assert server.proc.poll() is None
