"""What every management route shares: the error shape of seed 004, its OpenAPI entries, the
caller's identity as a dependency (a token, or a configured API key as admin) and paging."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, Field

from core.errors import AuthenticationFailed, AuthorizationFailed
from management.identity import Principal
from management.service import Management
from server.auth import presented_keys
from server.deps import ServicesDep


class ErrorInfo(BaseModel):
    code: str = Field(description="AUTHENTICATION_FAILED, AUTHORIZATION_FAILED, MODEL_NOT_FOUND, "
                                  "MODEL_ALREADY_EXISTS, MODEL_NOT_RUNNING, INSUFFICIENT_RESOURCES, "
                                  "OPERATION_TIMEOUT, INVALID_REQUEST, RATE_LIMITED, INTERNAL_ERROR, ...")
    message: str
    details: Any = None


class ManagementError(BaseModel):
    error: ErrorInfo
    timestamp: str = Field(description="ISO 8601, UTC")
    path: str | None


_DESCRIPTIONS = {
    400: "Bad request (malformed JSON, a path outside the allowed roots, an unsupported framework, ...)",
    401: "No token, or a bad, expired or tampered one, or wrong credentials (AUTHENTICATION_FAILED)",
    403: "The caller's role may not do this (AUTHORIZATION_FAILED)",
    404: "Unknown model, task or user", 409: "Conflict: the name exists, or the model is read-only or running",
    422: "Invalid field: unknown field, wrong type, value out of range (INVALID_REQUEST)",
    429: "Too many failed logins (see Retry-After)",
    503: "The model is stopped (MODEL_NOT_RUNNING), not installed, failed to load or overloaded",
    504: "Generation did not finish in time",
    502: "A remote engine failed (BAD_GATEWAY)",
}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ManagementError, "description": _DESCRIPTIONS[s],
                **({"headers": _RETRY_AFTER} if s in (429, 503) else {})} for s in (401, *statuses)}


async def _management(services: ServicesDep) -> Management:
    return services.management


ManagementDep = Annotated[Management, Depends(_management)]


async def _principal(request: Request, mgmt: ManagementDep) -> Principal:
    keys = request.app.state.keys
    for token in presented_keys(request.scope):
        principal = mgmt.identity.verify(token)
        if principal is not None:
            return principal
        if keys and keys.match(token):
            return Principal("api-key", "admin", "api_key")
    raise AuthenticationFailed("a valid bearer token is required (POST /api/auth/token)",
                               headers={"WWW-Authenticate": "Bearer"})


CurrentUser = Annotated[Principal, Depends(_principal)]


async def _admin(principal: CurrentUser) -> Principal:
    if not principal.is_admin:
        raise AuthorizationFailed(f"role '{principal.role}' may not do this (admin only)")
    return principal


AdminUser = Annotated[Principal, Depends(_admin)]


class MessageResponse(BaseModel):
    message: str
