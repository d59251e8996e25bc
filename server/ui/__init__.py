"""The browser playground: static files served at /ui (no build step, no CDN, works offline)."""
from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
