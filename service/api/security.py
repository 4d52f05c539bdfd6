"""API keys with scopes, and per-key rate limits.

Keys come from settings (`SCULPTOR_API_KEYS`, JSON: `[{"name", "key" | "key_sha256", "scopes"}]`)
and are kept only as SHA-256 digests, compared in constant time. Scopes: `generate` (generation
routes), `tasks` (upload and status), `admin` (everything, plus activate and force-promote).
With no keys configured the gateway is open, and then answers loopback clients only (service/api/exposure.py)
unless SCULPTOR_ALLOW_OPEN=true.
Tenants: tasks and jobs belong to the key that created them (its name); a key without `admin`
sees only its own, and only `admin` may set a task's gate thresholds.

Per-key limits (service/api/limits.py): a request rate per key, and generation requests in flight per key.
An open gateway limits nothing unless SCULPTOR_MAX_CONCURRENT_PER_KEY says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Depends, Request

from sculptor.config import ApiKey
from sculptor.records import ANONYMOUS
from service.api.errors import ApiError

SCOPES = ("generate", "tasks", "admin")


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def may_see(self, owner: str) -> bool:
        """A record of `owner`'s: an admin (and the open gateway, which holds every scope) sees all."""
        return self.is_admin or owner == self.name


OPEN = Caller(ANONYMOUS, frozenset(SCOPES))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, keys: list[ApiKey]):
        self.entries = [(k.key_sha256 or digest(k.key), Caller(k.name, frozenset(k.scopes))) for k in keys]

    @property
    def open(self) -> bool:
        return not self.entries

    def lookup(self, presented: str) -> Caller | None:
        wanted = digest(presented)
        found = None
        for stored, caller in self.entries:  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(stored, wanted):
                found = caller
        return found


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def require(scope: str, limit: str | None = None, hold_slot: bool = False):
    """A dependency: the caller must hold `scope` (or admin); `limit` names a rate limit to apply; `hold_slot`
    counts the request against the key's generation requests in flight until its answer has been sent."""

    async def check(request: Request) -> Caller:
        ring: KeyRing = request.app.state.keyring
        caller = OPEN
        if not ring.open:
            presented = _presented_key(request)
            if not presented:
                raise ApiError(401, "missing_api_key", "send an API key as `Authorization: Bearer <key>`",
                               headers={"WWW-Authenticate": "Bearer"})
            caller = ring.lookup(presented)
            if caller is None:
                raise ApiError(401, "invalid_api_key", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
            if scope not in caller.scopes and "admin" not in caller.scopes:
                raise ApiError(403, "insufficient_scope", f"this key lacks the {scope!r} scope")
        if limit and caller is not OPEN:
            settings = request.app.state.ctx.settings
            per_minute = {"generate": settings.rate_limit_generate_per_min,
                          "upload": settings.rate_limit_uploads_per_min}[limit]
            await asyncio.to_thread(request.app.state.rate_limiter.check, limit, caller.name, per_minute)
        return caller

    if not hold_slot:
        return Depends(check)

    async def check_and_hold(request: Request, caller: Caller = Depends(check)):
        with request.app.state.concurrency.hold(caller.name):
            yield caller

    return Depends(check_and_hold, scope="request")  # released once a streamed answer has ended too
