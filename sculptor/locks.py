"""Redis locks that stay held while their holder lives and expire soon after it dies.

A worker killed with SIGKILL cannot release its lock; the short TTL, renewed by a
background thread while the holder is alive, bounds how long the lock outlives it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import redis
from redis.lock import Lock


class LockBusy(RuntimeError):
    pass


@contextmanager
def held_lock(client: redis.Redis, name: str, ttl_s: int, wait_s: float | None = 0):
    lock = Lock(client, f"sculptor:lock:{name}", timeout=ttl_s, thread_local=False)
    if not lock.acquire(blocking=wait_s != 0, blocking_timeout=wait_s):
        raise LockBusy(name)
    stop = threading.Event()

    def renew():
        while not stop.wait(ttl_s / 3):
            try:
                lock.reacquire()
            except Exception:  # lost the lock or Redis is away: the holder finds out on release
                pass

    renewer = threading.Thread(target=renew, daemon=True, name=f"lock-{name}")
    renewer.start()
    try:
        yield lock
    finally:
        stop.set()
        renewer.join()
        try:
            lock.release()
        except Exception:
            pass
