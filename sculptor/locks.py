"""Redis locks that stay held while their holder lives and expire soon after it dies.

A worker killed with SIGKILL cannot release its lock; the short TTL, renewed by a
background thread while the holder is alive, bounds how long the lock outlives it.

A holder can also lose its lock while alive: a renewal finds the key gone or held by another token
(a pause longer than the TTL, an operator), or Redis stays away past the TTL so the key may have expired.
Then `HeldLock.lost` is set and `HeldLock.check()` raises LockLost, so the holder stops the work the
lock guarded instead of racing whoever holds it now.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import redis
from redis.exceptions import LockNotOwnedError
from redis.lock import Lock

log = logging.getLogger("sculptor.locks")


class LockBusy(RuntimeError):
    pass


class LockLost(RuntimeError):
    """The holder's lock expired or was taken while it worked."""


class HeldLock:
    def __init__(self, lock: Lock, name: str):
        self.lock, self.name = lock, name
        self.lost = threading.Event()
        self.reason = ""

    def mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()
            log.warning("lock %s lost: %s", self.name, reason)

    def check(self) -> None:
        if self.lost.is_set():
            raise LockLost(f"the lock {self.name} was lost ({self.reason})")


@contextmanager
def held_lock(client: redis.Redis, name: str, ttl_s: float, wait_s: float | None = 0) -> Iterator[HeldLock]:
    lock = Lock(client, f"sculptor:lock:{name}", timeout=ttl_s, thread_local=False)
    if not lock.acquire(blocking=wait_s != 0, blocking_timeout=wait_s):
        raise LockBusy(name)
    held = HeldLock(lock, name)
    stop = threading.Event()

    def renew():
        renewed = time.monotonic()
        while not stop.wait(ttl_s / 3) and not held.lost.is_set():
            try:
                lock.reacquire()  # an atomic check of the token and the TTL reset (redis-py's Lua script)
                renewed = time.monotonic()
            except LockNotOwnedError:
                held.mark_lost("its key expired or another holder took it")
            except redis.RedisError as err:  # Redis away: the key may outlive the outage, until the TTL says not
                if time.monotonic() - renewed >= ttl_s:
                    held.mark_lost(f"not renewed for {ttl_s:g} s, its TTL: {err}")

    renewer = threading.Thread(target=renew, daemon=True, name=f"lock-{name}")
    renewer.start()
    try:
        yield held
    finally:
        stop.set()
        renewer.join()
        if not held.lost.is_set():
            try:
                lock.release()
            except Exception:
                pass
