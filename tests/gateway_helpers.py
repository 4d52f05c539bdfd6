"""Start the real gateway over HTTP (uvicorn in a thread) on the tiny model, for tests."""

import threading
import time
from contextlib import contextmanager

import uvicorn

from sculptor import checkpoints
from sculptor.bootstrap import ensure_initial_version
from sculptor.config import Settings
from sculptor.context import Context
from sculptor.redis_server import free_port
from sculptor.tiny_model import build_tiny_model
from service.app import create_app


def tiny_settings(var_dir, redis_url, model_dir, **overrides) -> Settings:
    return Settings(**{"var_dir": var_dir, "redis_url": redis_url, "base_model_dir": str(model_dir),
                       "engine": "transformers", "engine_dtype": "float32", "engine_max_model_len": 256, **overrides})


@contextmanager
def running_gateway(settings: Settings, host: str = "127.0.0.1"):
    """Yield (base_url, ctx) for a gateway serving v0 on a fresh Redis database (uvicorn bound to `host`;
    base_url is on 127.0.0.1 either way)."""
    ctx = Context.from_settings(settings)
    ctx.redis.flushdb()
    ensure_initial_version(settings, ctx.redis, ctx.store)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}", ctx
    finally:
        server.should_exit = True
        thread.join(10)


def context_with_two_versions(root, redis_url) -> Context:
    """A context whose object store holds v0 and v1: tiny random Llamas of seeds 0 and 1 (built under root)."""
    context = Context.from_settings(Settings(var_dir=root / "var", redis_url=redis_url, engine_max_model_len=512))
    for version, seed in (("v0", 0), ("v1", 1)):
        checkpoints.publish_dir(context.store, build_tiny_model(root / version, seed=seed), version)
    return context
