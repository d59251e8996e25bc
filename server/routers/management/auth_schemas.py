"""Schemas of the login and user routes."""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenRequest(_Strict):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the token expires")


class NewUser(_Strict):
    username: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    password: str = Field(min_length=8, max_length=1024)
    role: Literal["admin", "user"] = "user"


class UserOut(BaseModel):
    username: str
    role: str
    created_at: datetime


class UserList(BaseModel):
    items: list[UserOut]
    total: int


class PasswordChange(_Strict):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=8, max_length=1024)
