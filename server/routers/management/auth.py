"""Login (seed 004's ``POST /api/auth/token``) and users: admins manage them, anyone changes their
own password."""
from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Request

from server.routers.management.auth_schemas import (NewUser, PasswordChange, TokenRequest, TokenResponse, UserList,
                                                    UserOut)
from server.routers.management.common import (AdminUser, CurrentUser, ManagementDep, MessageResponse,
                                              error_responses)

router = APIRouter(tags=["management: auth"])


@router.post("/auth/token", response_model=TokenResponse, responses=error_responses(422, 429))
async def token(req: TokenRequest, request: Request, mgmt: ManagementDep) -> TokenResponse:
    """Exchange a user name and password for a bearer token (HS256 JWT)."""
    address = request.client.host if request.client else "local"
    issued = await mgmt.identity.login(req.username, req.password, address)
    return TokenResponse(access_token=issued.access_token, expires_in=issued.expires_in)


@router.get("/users", response_model=UserList, responses=error_responses(403))
async def list_users(_: AdminUser, mgmt: ManagementDep) -> UserList:
    """Every user and their role (admin only)."""
    users = await mgmt.identity.users()
    return UserList(items=[UserOut(username=u.username, role=u.role, created_at=u.created_at) for u in users],
                    total=len(users))


@router.get("/users/me", response_model=UserOut)
async def me(principal: CurrentUser, mgmt: ManagementDep) -> UserOut:
    """The caller: user name and role (an API key is the built-in admin 'api-key')."""
    for u in await mgmt.identity.users():
        if u.username == principal.username:
            return UserOut(username=u.username, role=u.role, created_at=u.created_at)
    return UserOut(username=principal.username, role=principal.role, created_at=datetime.now(timezone.utc))


@router.post("/users", response_model=UserOut, status_code=201, responses=error_responses(400, 403, 409, 422))
async def create_user(req: NewUser, _: AdminUser, mgmt: ManagementDep) -> UserOut:
    """Add a user with the role admin or user (admin only)."""
    u = await mgmt.identity.create_user(req.username, req.password, req.role)
    return UserOut(username=u.username, role=u.role, created_at=u.created_at)


@router.delete("/users/{username}", response_model=MessageResponse, responses=error_responses(403, 404, 409))
async def delete_user(username: str, principal: AdminUser, mgmt: ManagementDep) -> MessageResponse:
    """Remove a user (admin only; not yourself, not the last admin). Their tokens stop working at once."""
    await mgmt.identity.delete_user(username, principal)
    return MessageResponse(message=f"user '{username}' deleted")


@router.put("/users/me/password", response_model=MessageResponse, responses=error_responses(400, 422))
async def change_password(req: PasswordChange, principal: CurrentUser, mgmt: ManagementDep) -> MessageResponse:
    """Change the caller's own password (the current one is required)."""
    await mgmt.identity.change_password(principal, req.current_password, req.new_password)
    return MessageResponse(message="password changed")
