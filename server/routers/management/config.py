"""Live configuration (seed 004): GET /api/config and PUT /api/config (admin, partial). A change takes
effect at once, is stored in the database (where it wins over config.yaml) and survives restarts."""
from __future__ import annotations

from fastapi import APIRouter

from server.routers.management.common import AdminUser, CurrentUser, ManagementDep, error_responses
from server.routers.management.config_schemas import ConfigResponse, ConfigUpdate

router = APIRouter(tags=["management: config"])


def _current(mgmt, changed=None) -> ConfigResponse:
    live = mgmt.live
    return ConfigResponse(**live.values.model_dump(), sources=live.sources(), changed=changed)


@router.get("/config", response_model=ConfigResponse, response_model_exclude_none=False, responses=error_responses())
async def get_config(_: CurrentUser, mgmt: ManagementDep) -> ConfigResponse:
    """The live settings and where each comes from."""
    return _current(mgmt)


@router.put("/config", response_model=ConfigResponse, responses=error_responses(403, 422))
async def put_config(req: ConfigUpdate, principal: AdminUser, mgmt: ManagementDep) -> ConfigResponse:
    """Change some settings now (admin): gpu_monitor_interval, max_concurrent_models, default_model_timeout,
    health_check_interval, log_level, alert_thresholds (partial). A null value goes back to config.yaml's."""
    changed = await mgmt.live.update(req.model_dump(exclude_unset=True), principal.username)
    return _current(mgmt, changed)
