"""Prometheus metrics for the gateway (exposed at GET /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

REQUESTS = Counter("sculptor_http_requests_total", "HTTP requests", ["route", "method", "status"])
LATENCY = Histogram("sculptor_http_request_seconds", "HTTP request latency", ["route"])
TOKENS = Counter("sculptor_generated_tokens_total", "Tokens generated", ["kind"])
SWAPS = Counter("sculptor_swaps_total", "Engine hot-swaps", ["outcome"])
SWAP_SECONDS = Histogram("sculptor_swap_seconds", "Hot-swap duration (fetch + stall)",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
SERVING = Info("sculptor_serving", "The model version the engine is serving")
QUEUE_DEPTH = Gauge("sculptor_queue_depth", "Jobs waiting in the training queue")
JOBS = Gauge("sculptor_jobs", "Jobs by status", ["status"])


def set_serving_version(version: str) -> None:
    SERVING.info({"version": version})
