"""The management surface (seed 004, ``/api/...``): one small router per resource, schemas beside
them. Every route needs a bearer token (a management JWT, or a configured API key as admin) but
the login; errors are ``{"error": {"code", "message", "details"}, "timestamp", "path"}``.
``/ws/monitor`` sits beside the ``/api`` routes."""
from fastapi import APIRouter

from server.routers.management import alerts, auth, inference, lifecycle, logs, models, ws_monitor
from server.routers.management import config, monitoring, system

api = APIRouter(prefix="/api")
for _module in (auth, models, lifecycle, logs, inference, system, monitoring, config, alerts):
    api.include_router(_module.router)

router = APIRouter()
router.include_router(api)
router.include_router(ws_monitor.router)
