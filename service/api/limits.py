"""Per-key limits: a request rate (a token bucket in Redis, shared by every gateway) and generation requests
in flight (counted per gateway).

Limits belong to keys. An open gateway (no keys, loopback clients only unless SCULPTOR_ALLOW_OPEN) limits
nothing by default, as vLLM's, TGI's and Ollama's own servers do not: its callers are the machine's own.

The bucket holds up to a minute's allowance (`per_minute` requests) and refills continuously at
`per_minute / 60` a second, so a key may burst to a minute's allowance once and then keeps to the rate;
a fixed window would also grant two allowances back to back around its boundary. The bucket is a Lua
script, so the read, refill and take are one atomic step across gateways, on Redis's own clock. redis-py's
`register_script` runs it by digest (EVALSHA) and loads it again when Redis lost it. A small script rather
than a rate-limit package: it runs on the client the gateway already holds, with its timeouts, and a
Redis that is away lets requests through (serving must outlive Redis) instead of failing them.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager

import redis

from service.api.errors import ApiError

# KEYS[1]: the bucket (a hash: tokens, at). ARGV: capacity, refill per second.
# Returns 0 when a token was taken, else the milliseconds until one is there.
TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local per_s = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local elapsed = math.max(0, now - (tonumber(state[2]) or now))
tokens = math.min(capacity, tokens + elapsed * per_s)
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_ms = math.ceil((1 - tokens) / per_s * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / per_s * 1000) + 1000)
return wait_ms
"""


class RateLimiter:
    def __init__(self, client: redis.Redis):
        self.take = client.register_script(TOKEN_BUCKET)

    def check(self, kind: str, key_name: str, per_minute: int) -> None:
        """Take one request from `key_name`'s `kind` bucket, or raise 429 with Retry-After."""
        if per_minute <= 0:
            return
        try:
            wait_ms = self.take(keys=[f"sculptor:ratelimit:{kind}:{key_name}"], args=[per_minute, per_minute / 60])
        except redis.RedisError:
            return  # Redis away: let the request through
        if wait_ms:
            retry = max(1, math.ceil(wait_ms / 1000))
            raise ApiError(429, "rate_limited",
                           f"the key {key_name!r} is over its limit of {per_minute} {kind} requests a minute; "
                           f"retry in {retry} s", headers={"Retry-After": str(retry)})


class ConcurrencyLimit:
    """Generation requests in flight per key on this gateway; 0: unlimited. The gateway's requests run on one
    event loop, so the check and the count need no lock."""

    RETRY_AFTER_S = 1

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: Counter[str] = Counter()

    @contextmanager
    def hold(self, key_name: str):
        if self.limit and self.in_flight[key_name] >= self.limit:
            raise ApiError(429, "too_many_concurrent_requests",
                           f"the key {key_name!r} already has {self.limit} generation requests in flight, its limit "
                           "(SCULPTOR_MAX_CONCURRENT_PER_KEY); retry when one has finished",
                           headers={"Retry-After": str(self.RETRY_AFTER_S)})
        self.in_flight[key_name] += 1
        try:
            yield
        finally:
            self.in_flight[key_name] -= 1
            if not self.in_flight[key_name]:
                del self.in_flight[key_name]


DEFAULT_CONCURRENT_WITH_KEYS = 64


def concurrency_limit(configured: int | None, open_gateway: bool) -> int:
    """SCULPTOR_MAX_CONCURRENT_PER_KEY, or its default: unlimited when open, 64 with keys."""
    if configured is not None:
        return configured
    return 0 if open_gateway else DEFAULT_CONCURRENT_WITH_KEYS
