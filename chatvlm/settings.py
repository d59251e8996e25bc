"""Which settings file an in-process command uses when none is named."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def config_path(given: Path | None) -> Path | None:
    """--config, else $CHATVLM_CONFIG, else ./config.yaml, else the source tree's, else the one
    `pip install .` put under <prefix>/share/chatvlm/ (None: built-in defaults only)."""
    if given is not None:
        return given
    if os.environ.get("CHATVLM_CONFIG"):
        return Path(os.environ["CHATVLM_CONFIG"])
    from core.config import DEFAULT_CONFIG

    for candidate in (Path("config.yaml"), DEFAULT_CONFIG, Path(sys.prefix) / "share" / "chatvlm" / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None
