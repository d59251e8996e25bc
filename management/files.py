"""Secrets written once into the data directory, readable by the owner only."""
from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str) -> bool:
    """Create ``path`` with mode 0600 holding ``text``; False when it already exists (never overwritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


def read_or_create(path: Path, make) -> str:
    """The file's text, creating it first (mode 0600) from ``make()`` when missing."""
    if not path.exists():
        write_private(path, make())
    return path.read_text(encoding="utf-8").strip()
