"""The documents a run reads: files and folders (walked recursively), recognised by their bytes."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from core.imaging import sniff_format

READABLE = frozenset({"JPEG", "PNG", "BMP", "TIFF", "PDF"})
# In a folder, a file with one of these names whose bytes are not a readable image or PDF is
# reported as failed (someone meant it to be read); any other unrecognised file is skipped.
DOCUMENT_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pdf", ".gif", ".webp"})
HEAD = 32


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: Path          # relative to the folder it was found in (the file name for a file argument)
    format: str | None  # sniffed from the first bytes; None when unrecognised (it will fail)


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(HEAD)


def collect(paths: list[Path]) -> list[InputFile]:
    """Every file to read, in a stable order. A missing path raises FileNotFoundError."""
    found: list[InputFile] = []
    seen: set[Path] = set()
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(str(root))
        if root.is_file():
            candidates = [(root, Path(root.name), True)]
        else:
            candidates = [(p, p.relative_to(root), False) for p in sorted(root.rglob("*")) if p.is_file()]
        for path, name, explicit in candidates:
            real = path.resolve()
            if real in seen:
                continue
            try:
                fmt = sniff_format(_head(path))
            except OSError:
                fmt = None
            readable = fmt in READABLE
            if readable or explicit or path.suffix.lower() in DOCUMENT_SUFFIXES:
                seen.add(real)
                found.append(InputFile(path, name, fmt if readable else None))
    return found


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
