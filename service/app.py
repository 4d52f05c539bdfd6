"""The gateway: FastAPI app factory. Run with `uvicorn service.app:create_app --factory`.

At start-up it connects to Redis and the object store, loads the current model version into the
engine, and follows promotions for as long as it runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from sculptor import logs
from sculptor.config import Settings, get_settings
from sculptor.context import Context
from sculptor.records import ensure_indexes
from sculptor.recovery import recover_orphans
from service import metrics
from service.api import errors
from service.api.exposure import MESSAGE, LoopbackOnly, is_loopback_host
from service.api.limits import ConcurrencyLimit, RateLimiter, concurrency_limit
from service.api.security import KeyRing
from service.api.routes import dashboard, generate, health, jobs, models, openai, registry, tasks
from service.engines.base import Engine
from service.hotswap import ServingModel
from service.promotions import PromotionListener

log = logging.getLogger("sculptor.gateway")


def make_engines(settings: Settings) -> list[Engine]:
    """`engine_replicas` engines, each its own vLLM instance (and engine-core process)."""
    return [make_engine(settings) for _ in range(settings.engine_replicas)]


def make_engine(settings: Settings) -> Engine:
    kind = settings.engine
    if kind == "auto":
        try:
            import vllm  # noqa: F401

            kind = "vllm"
        except ImportError:
            kind = "transformers"
    if kind == "vllm":
        from service.engines.vllm_engine import VLLMEngine

        return VLLMEngine(settings.engine_dtype, settings.engine_max_model_len, settings.engine_max_num_seqs,
                          settings.engine_enforce_eager, settings.engine_kv_cache_gib, settings.swap_pause_mode,
                          _tensor_parallel_size(settings), settings.engine_gpu_memory_utilization,
                          settings.engine_tool_call_parser or None, settings.engine_json_without_whitespace)
    from service.engines.hf_engine import TransformersEngine

    return TransformersEngine(settings.engine_dtype, settings.engine_max_model_len)


def _tensor_parallel_size(settings: Settings) -> int:
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and settings.engine_tensor_parallel_size > 1:
        log.warning("tensor parallelism needs GPUs: this CPU engine runs with tensor_parallel_size=1")
        return 1
    return settings.engine_tensor_parallel_size


async def recover_jobs(ctx: Context) -> None:
    """Periodically re-queue or fail jobs whose worker died (see sculptor/recovery.py), and delete jobs that
    ended more than SCULPTOR_JOB_RETENTION_DAYS ago."""
    while True:
        await asyncio.sleep(ctx.settings.recovery_interval_s)
        try:
            await asyncio.to_thread(recover_orphans, ctx)
            await asyncio.to_thread(ctx.jobs.sweep_ended, ctx.settings.job_retention_days * 86400)
        except Exception as err:  # Redis away: try again next round
            log.warning("job recovery skipped: %s", err)


@asynccontextmanager
async def lifespan(app: FastAPI):
    ctx: Context = app.state.ctx
    serving = ServingModel(ctx, make_engines(ctx.settings))
    app.state.serving = serving
    version = ctx.versions.current()
    if version is None:
        raise RuntimeError("no model version is registered: start Sculptor with `make run` (it registers v0)")
    await asyncio.to_thread(ensure_indexes, ctx.tasks, ctx.jobs)  # once, for records from before the indexes
    log.info("loading %s into %d %s engine(s)", version, len(serving.pool), serving.engine.name)
    await serving.start(version)
    background = [asyncio.create_task(PromotionListener(serving).run()), asyncio.create_task(recover_jobs(ctx))]
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        await serving.shutdown()


async def record_request(request: Request, call_next):
    started = time.monotonic()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    metrics.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    metrics.LATENCY.labels(route).observe(time.monotonic() - started)
    return response


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.setup(settings)
    app = FastAPI(title="Sculptor", version="0.1.0", lifespan=lifespan,
                  description="A model server that keeps learning without forgetting.")
    app.state.ctx = Context.from_settings(settings)
    app.state.keyring = KeyRing(settings.api_keys)
    app.state.rate_limiter = RateLimiter(app.state.ctx.redis)
    app.state.concurrency = ConcurrencyLimit(concurrency_limit(settings.max_concurrent_per_key, app.state.keyring.open))
    errors.install(app)
    app.middleware("http")(record_request)
    for module in (tasks, jobs, generate, openai, models, registry, health, dashboard):
        app.include_router(module.router)
    app.include_router(openai.tokens_router)
    if app.state.keyring.open:
        guard_open_gateway(app, settings)
    return app


def guard_open_gateway(app: FastAPI, settings: Settings) -> None:
    """Without keys, answer loopback clients only (service/api/exposure.py) unless allow_open says otherwise."""
    if settings.allow_open:
        log.warning("no API keys configured and SCULPTOR_ALLOW_OPEN=true: the gateway grants every scope, "
                    "admin included, to anyone who can reach it")
        return
    app.add_middleware(LoopbackOnly)  # added last: the outermost layer, before routing and metrics
    if not is_loopback_host(settings.host):
        log.warning("no API keys configured: SCULPTOR_HOST=%s, but only loopback clients will be answered (%s)",
                    settings.host, MESSAGE)
