"""The management surface (seed 004, ``/api/...``): one small router per resource, schemas beside
them. Every route needs a bearer token (a management JWT, or a configured API key as admin) but
the login; errors are ``{"error": {"code", "message", "details"}, "timestamp", "path"}``."""
from fastapi import APIRouter

from server.routers.management import auth, inference, lifecycle, logs, models
from server.routers.management import config, monitoring, system

router = APIRouter(prefix="/api")
for _module in (auth, models, lifecycle, logs, inference, system, monitoring, config):
    router.include_router(_module.router)
