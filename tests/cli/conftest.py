"""The chatvlm command run as a real process, in-process mode and against a real server."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pdf_docs import text_page, text_pdf
from tests.server_process import ROOT, RemoteServer

SAMPLES = ROOT / "samples"


def cli_env(tmp: Path) -> dict[str, str]:
    # The caches the in-process run writes go to a temp data dir, as the server's do in tests.
    return {**os.environ, "CHATVLM_DATA_DIR": str(tmp / "data"), "CHATVLM_SERVER__LOG_LEVEL": "warning",
            "COLUMNS": "200"}


def chatvlm(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 600,
            **kw) -> subprocess.CompletedProcess:
    """``python -m chatvlm ARGS`` with stdout and stderr captured (stdout is a pipe, not a terminal)."""
    return subprocess.run([sys.executable, "-m", "chatvlm", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def docs_folder(tmp_path_factory) -> Path:
    """Images (one in a subfolder, one without a suffix), a 2-page PDF, a broken PNG and a stray text file."""
    root = tmp_path_factory.mktemp("docs")
    (root / "sub").mkdir()
    (root / "receipt_en.png").write_bytes((SAMPLES / "receipt_en.png").read_bytes())
    (root / "sub" / "line_zh.png").write_bytes((SAMPLES / "line_zh.png").read_bytes())
    text_page(["HELLO FROM A FILE", "WITHOUT A SUFFIX"]).save(root / "scan_without_suffix", format="PNG")
    pdf, _ = text_pdf(2)
    (root / "contract.pdf").write_bytes(pdf)
    (root / "broken.png").write_bytes((SAMPLES / "receipt_en.png").read_bytes()[:300])
    (root / "notes.txt").write_text("not a document\n")
    return root


@pytest.fixture(scope="session")
def no_weights(tmp_path_factory) -> Path:
    """An empty models folder, shared by the server and the in-process runs (answers that name a
    folder, as a fallback's reason does, are then the same)."""
    return tmp_path_factory.mktemp("no_weights")


@pytest.fixture(scope="session")
def ocr_server(no_weights):
    # A busy shared machine can take longer than the default 30 s for a first load (doc_cpu).
    with RemoteServer(models_dir=no_weights, env={"CHATVLM_LIMITS__REQUEST_TIMEOUT_S": "300"}) as server:
        yield server
