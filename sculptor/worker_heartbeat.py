"""Which training workers are alive: each worker refreshes a short-lived Redis key while it runs.

A worker busy in a job cannot answer Celery's own ping (the solo pool runs the job in its only
thread), so liveness is a key renewed by a background thread, which the gateway reads for /readyz.
A worker killed with SIGKILL stops renewing, and its key expires within `ttl_s`.
"""

from __future__ import annotations

import threading

import redis

PREFIX = "sculptor:worker:"


def start_heartbeat(client: redis.Redis, name: str, ttl_s: int = 10) -> threading.Event:
    """Refresh this worker's key every ttl_s / 3 until the returned event is set."""
    stop = threading.Event()

    def beat():
        while True:
            try:
                client.set(PREFIX + name, "alive", ex=ttl_s)
            except redis.RedisError:  # Redis away: the key lapses, and the gateway reports no worker
                pass
            if stop.wait(ttl_s / 3):
                break
        try:
            client.delete(PREFIX + name)
        except redis.RedisError:
            pass

    threading.Thread(target=beat, daemon=True, name="worker-heartbeat").start()
    return stop


def alive_workers(client: redis.Redis) -> list[str]:
    return sorted(key.removeprefix(PREFIX) for key in client.scan_iter(match=PREFIX + "*", count=100))
