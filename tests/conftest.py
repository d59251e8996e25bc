"""Shared fixtures: tiny random-weight checkpoints built once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_THREAD_LIMIT", "1")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """A models_dir holding tiny checkpoints under the registry ids (see scripts/make_tiny_models.py)."""
    from scripts.make_tiny_models import build_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    build_tiny_models(out)
    return out
