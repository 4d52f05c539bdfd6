"""Prometheus metrics for the gateway (exposed at GET /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

REQUESTS = Counter("sculptor_http_requests_total", "HTTP requests", ["route", "method", "status"])
LATENCY = Histogram("sculptor_http_request_seconds", "HTTP request latency", ["route"])
TOKENS = Counter("sculptor_generated_tokens_total", "Tokens generated", ["kind"])
SWAPS = Counter("sculptor_swaps_total", "Engine hot-swaps", ["outcome"])
SWAP_SECONDS = Histogram("sculptor_swap_seconds", "Hot-swap duration (fetch + fleet lock + roll)",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
SERVING = Info("sculptor_serving", "The model version the engine is serving")
REPLICA_VERSION = Info("sculptor_replica", "The model version each engine replica holds", ["replica"])
REPLICA_ADMITTED = Gauge("sculptor_replica_admitted", "1 while the replica takes new requests", ["replica"])
REPLICA_IN_FLIGHT = Gauge("sculptor_replica_in_flight", "Requests in flight on the replica", ["replica"])
ENGINE_RUNNING = Gauge("sculptor_engine_running_requests", "Requests the replica's engine is generating", ["replica"])
QUEUE_DEPTH = Gauge("sculptor_queue_depth", "Jobs waiting in the training queue")
JOBS = Gauge("sculptor_jobs", "Jobs by status", ["status"])
TRAIN_STEP_SECONDS = Gauge("sculptor_train_step_seconds", "Mean training step time of the latest finished job")
GATE_OUTCOMES = Gauge("sculptor_gate_outcomes", "Gated candidates by outcome", ["outcome"])


def set_serving_version(version: str) -> None:
    SERVING.info({"version": version})


def set_replica(index: int, version: str | None, admitted: bool) -> None:
    REPLICA_VERSION.labels(str(index)).info({"version": version or ""})
    REPLICA_ADMITTED.labels(str(index)).set(int(admitted))


def refresh_engine_gauges(serving) -> None:
    for replica in serving.pool.replicas:
        ENGINE_RUNNING.labels(str(replica.index)).set(replica.engine.running_requests())


LATEST_JOBS_READ = 20  # ended jobs read for the latest step time (the newest one that trained)


def refresh_job_gauges(ctx) -> None:
    """Job-derived gauges at scrape time, from the job indexes and counters: no scrape reads every record."""
    for status, count in ctx.jobs.status_counts().items():
        JOBS.labels(status).set(count)
    QUEUE_DEPTH.set(ctx.redis.llen(ctx.settings.train_queue))
    for outcome, count in ctx.jobs.gate_outcomes().items():
        GATE_OUTCOMES.labels(outcome).set(count)
    trained = [j for j in ctx.jobs.latest_ended(LATEST_JOBS_READ) if j.training]
    if trained:
        TRAIN_STEP_SECONDS.set(trained[0].training.mean_step_s)
