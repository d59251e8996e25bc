"""Real server processes for end-to-end tests: one with only the CPU engines (the
out-of-the-box setup) and one serving the tiny checkpoints."""
from __future__ import annotations

import difflib
import json

import pytest

from tests.server_process import ROOT, RemoteServer

SAMPLES = ROOT / "samples"
EXPECTED = json.loads((SAMPLES / "expected.json").read_text(encoding="utf-8"))


def similarity(got: str, want: str) -> float:
    """Character similarity ignoring whitespace layout."""
    norm = lambda s: "".join(s.split())  # noqa: E731
    return difflib.SequenceMatcher(None, norm(got), norm(want)).ratio()


@pytest.fixture(scope="session")
def cpu_server(tmp_path_factory):
    """The server as `make run` starts it on a machine without weights."""
    empty = tmp_path_factory.mktemp("no_weights")
    with RemoteServer(models_dir=empty) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server(tiny_models_dir):
    with RemoteServer(models_dir=tiny_models_dir) as server:
        yield server
