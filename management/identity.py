"""Users, roles and tokens: argon2 password hashes (pwdlib), HS256 JWTs (pyjwt), the first admin.

Token checks run on every request of every surface when keys are on, so they never touch the
database: the users' roles are cached here and refreshed on every change this process makes.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy.exc import IntegrityError

from core.config import ManagementSettings
from core.errors import AuthenticationFailed, BadRequest, Conflict, NotFound
from management.files import read_or_create, write_private
from management.throttle import LoginThrottle
from store import users as users_repo
from store.db import Database

log = logging.getLogger("chatvlm.management")

ROLES = ("admin", "user")
ISSUER = "chatvlm"
USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_FAILED = "invalid credentials or token"  # one message for every failure: no hint which one


@dataclass(frozen=True)
class Principal:
    username: str
    role: str
    via: str  # "token" | "api_key"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class User:
    username: str
    role: str
    created_at: object


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int


class Identity:
    def __init__(self, settings: ManagementSettings, data_dir: Path, limits_storage: str | None = None) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.hasher = PasswordHash((Argon2Hasher(),))
        self.throttle = LoginThrottle(settings.login_failures_per_user, settings.login_failures_per_address,
                                      limits_storage)  # rate_limit.storage_url: shared by replicas
        self._secret: str | None = None
        self._roles: dict[str, str] = {}
        self._dummy_hash = ""
        self.db: Database | None = None

    # ---- start-up ------------------------------------------------------------------------------
    def start(self, db: Database) -> None:
        """Load or create the signing secret and the first admin (blocking: run off the event loop)."""
        self.db = db
        self._secret = self.settings.jwt_secret or read_or_create(
            self.data_dir / "jwt_secret", lambda: secrets.token_urlsafe(48))
        self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))
        with db.session() as s:
            empty = users_repo.count(s) == 0
        if empty:
            self._bootstrap_admin()
        self._reload_roles()

    def _bootstrap_admin(self) -> None:
        password = self.settings.admin_password
        generated = password is None
        if generated:
            password = secrets.token_urlsafe(18)
        try:
            with self.db.session() as s:
                users_repo.add(s, "admin", self.hasher.hash(password), "admin")
        except IntegrityError:  # another replica sharing the database created it first
            return
        if generated:
            path = self.data_dir / "initial_admin_password"
            path.unlink(missing_ok=True)  # a stale file from an older database would be wrong
            write_private(path, password + "\n")
            log.warning("created user 'admin'; its generated password is in %s (mode 0600). "
                        "Change it with PUT /api/users/me/password", path.resolve())
        else:
            log.warning("created user 'admin' with the configured password (management.admin_password "
                        "or CHATVLM_ADMIN_PASSWORD)")

    def _reload_roles(self) -> None:
        with self.db.session() as s:
            self._roles = {u.username: u.role for u in users_repo.list_all(s)}

    async def refresh(self) -> None:
        """Pick up users created, changed or deleted through other replicas sharing the database."""
        await asyncio.to_thread(self._reload_roles)

    # ---- tokens --------------------------------------------------------------------------------
    def issue(self, username: str) -> IssuedToken:
        now = int(time.time())
        ttl = self.settings.token_ttl_s
        claims = {"sub": username, "iss": ISSUER, "iat": now, "exp": now + ttl, "jti": secrets.token_hex(8)}
        return IssuedToken(jwt.encode(claims, self._secret, algorithm="HS256"), ttl)

    def verify(self, token: str) -> Principal | None:
        """The token's user, or None for anything wrong (bad signature, expired, alg none, unknown user)."""
        if self._secret is None or token.count(".") != 2:
            return None
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"], issuer=ISSUER,
                                options={"require": ["exp", "iat", "sub", "iss"]})
        except jwt.PyJWTError:
            return None
        username = claims.get("sub")
        role = self._roles.get(username) if isinstance(username, str) else None
        return Principal(username, role, "token") if role else None

    # ---- logins and users ----------------------------------------------------------------------
    async def login(self, username: str, password: str, address: str) -> IssuedToken:
        self.throttle.check(username, address)
        user = await self.db.run(users_repo.get, username)
        # Hash work is done for unknown users too, so timing does not tell a known name apart.
        stored = user.password_hash if user else self._dummy_hash
        ok = await asyncio.to_thread(self.hasher.verify, password, stored)
        if not (ok and user):
            self.throttle.failed(username, address)
            raise AuthenticationFailed(_FAILED, headers={"WWW-Authenticate": "Bearer"})
        self.throttle.succeeded(username)
        return self.issue(username)

    async def users(self) -> list[User]:
        return [User(u.username, u.role, u.created_at) for u in await self.db.run(users_repo.list_all)]

    async def create_user(self, username: str, password: str, role: str) -> User:
        if not USERNAME.fullmatch(username):
            raise BadRequest("username must match ^[a-z0-9][a-z0-9._-]{0,63}$", param="username",
                             code="INVALID_REQUEST")
        hashed = await asyncio.to_thread(self.hasher.hash, password)
        try:
            rec = await self.db.run(users_repo.add, username, hashed, role)
        except IntegrityError:
            raise Conflict(f"user '{username}' already exists", param="username", code="USER_ALREADY_EXISTS") from None
        await asyncio.to_thread(self._reload_roles)
        return User(rec.username, rec.role, rec.created_at)

    async def delete_user(self, username: str, acting: Principal) -> None:
        if username == acting.username:
            raise Conflict("you cannot delete yourself", param="username", code="CANNOT_DELETE_SELF")

        def remove(s) -> None:
            user = users_repo.get(s, username)
            if user is None:
                raise NotFound(f"user '{username}' not found", param="username", code="USER_NOT_FOUND")
            if user.role == "admin" and users_repo.count_role(s, "admin") <= 1:
                raise Conflict("the last admin cannot be deleted", param="username", code="LAST_ADMIN")
            users_repo.remove(s, username)

        await self.db.run(remove)
        await asyncio.to_thread(self._reload_roles)

    async def change_password(self, principal: Principal, current: str, new: str) -> None:
        if principal.via != "token":
            raise BadRequest("an API key has no password; log in as a user", code="INVALID_REQUEST")
        user = await self.db.run(users_repo.get, principal.username)
        if user is None or not await asyncio.to_thread(self.hasher.verify, current, user.password_hash):
            raise AuthenticationFailed(_FAILED)
        hashed = await asyncio.to_thread(self.hasher.hash, new)
        await self.db.run(users_repo.set_password, principal.username, hashed)
