"""The playground at /ui: static files only. It calls the public API like any client, so it
holds no route of its own; the page loads without a key, and every call it makes needs one."""
from __future__ import annotations

from starlette.staticfiles import StaticFiles

from server.ui import STATIC_DIR

PREFIX = "/ui"


def mount(app) -> None:
    """Serve /ui/ (index.html) and its assets; /ui redirects to /ui/."""
    app.mount(PREFIX, StaticFiles(directory=STATIC_DIR, html=True), name="ui")
