"""Streaming load clients for bench_serving.py, and the statistics computed from what they saw.

Each client sends OpenAI chat completions with `stream=true` one after another until the
phase's deadline, and records, per request: when it started, the arrival time of every content
chunk, the `model_version` each chunk carried (the gateway puts it in every chunk; vLLM's own
server has none), the completion token count from the final usage chunk, and any error.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

TOPICS = ["the moon", "volcanoes", "bread", "chess", "rivers", "honeybees", "the printing press", "glaciers",
          "jazz", "octopuses", "bridges", "tea", "comets", "deserts", "the violin", "coral reefs", "maps",
          "lighthouses", "mushrooms", "trains", "owls", "paper", "thunderstorms", "gardens", "the alphabet",
          "penguins", "clocks", "salt", "kites", "mountains", "bicycles", "rainbows"]
TEMPLATES = ["Write a short poem about {}.", "Explain {} to a child in two sentences.",
             "Give three surprising facts about {}.", "Describe {} in one paragraph.",
             "Write a haiku about {}.", "What would a historian say about {}?",
             "Tell a very short story that involves {}."]


def prompt_for(client: int, n: int) -> str:
    i = client * 7919 + n * 104729  # spread clients and turns over the template x topic grid
    return TEMPLATES[i % len(TEMPLATES)].format(TOPICS[(i // len(TEMPLATES)) % len(TOPICS)])


@dataclass
class Request:
    client: int
    start: float
    end: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying text
    versions: list[str] = field(default_factory=list)  # model_version of each of those chunks
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def version(self) -> str:
        return self.versions[0] if self.versions else ""


@dataclass
class LoadConfig:
    base_url: str
    model: str
    clients: int = 32
    duration_s: float = 60.0
    max_tokens: int = 64
    temperature: float = 0.7
    request_timeout_s: float = 120.0


def _payload(cfg: LoadConfig, prompt: str, max_tokens: int) -> dict:
    return {"model": cfg.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": cfg.temperature, "stream": True, "stream_options": {"include_usage": True}}


def _take_chunk(req: Request, data: str) -> None:
    chunk = json.loads(data)
    if chunk.get("usage"):
        req.completion_tokens = chunk["usage"].get("completion_tokens")
    for choice in chunk.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            req.token_times.append(time.monotonic())
            req.versions.append(chunk.get("model_version", ""))


async def one_request(http: httpx.AsyncClient, cfg: LoadConfig, client: int, prompt: str,
                      max_tokens: int | None = None, out: list[Request] | None = None) -> Request:
    req = Request(client, time.monotonic())
    if out is not None:  # listed from its start, so a request cut off at the phase timeout still counts
        out.append(req)
    try:
        async with http.stream("POST", "/v1/chat/completions",
                               json=_payload(cfg, prompt, max_tokens or cfg.max_tokens)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                req.error = f"HTTP {resp.status_code}: {body[:300]}"
                return req
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                _take_chunk(req, data)
        req.end = time.monotonic()
    except Exception as err:  # a broken stream is a failed request, not a crashed benchmark
        req.error = f"{type(err).__name__}: {err}"[:300]
    return req


def http_client(cfg: LoadConfig) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=cfg.base_url, timeout=httpx.Timeout(cfg.request_timeout_s),
                             limits=httpx.Limits(max_connections=cfg.clients * 2, max_keepalive_connections=cfg.clients))


async def _client_loop(http: httpx.AsyncClient, cfg: LoadConfig, client: int, deadline: float,
                       out: list[Request]) -> None:
    n = 0
    while time.monotonic() < deadline:
        req = await one_request(http, cfg, client, prompt_for(client, n), out=out)
        n += 1
        if req.error:
            await asyncio.sleep(0.2)  # do not spin on a failing server


PROBE = -1  # client id of the probe
PHASE_GRACE_S = 300.0  # how long requests in flight at the deadline may take to finish (a saturated box is slow)


async def _probe_loop(http: httpx.AsyncClient, cfg: LoadConfig, deadline: float, out: list[Request]) -> None:
    """One extra client sending 1-token requests back to back: it sees a new version as soon as the
    gateway admits requests under it, whatever the length of the load clients' streams. Its requests
    are left out of the phase statistics."""
    n = 0
    while time.monotonic() < deadline:
        await one_request(http, cfg, PROBE, prompt_for(0, n), max_tokens=1, out=out)
        n += 1
        await asyncio.sleep(0.1)


async def run_load(cfg: LoadConfig, during=None) -> tuple[float, list[Request]]:
    """All clients, each in a loop until duration_s; requests in flight at the deadline finish.
    `during(t0)`, if given, is a coroutine run alongside (the promotions of the gateway phase)."""
    out: list[Request] = []
    async with http_client(cfg) as http:
        t0 = time.monotonic()
        deadline = t0 + cfg.duration_s
        loops = [_client_loop(http, cfg, c, deadline, out) for c in range(cfg.clients)]
        loops.append(_probe_loop(http, cfg, deadline, out))
        if during is not None:
            loops.append(during(t0))
        tasks = [asyncio.ensure_future(loop) for loop in loops]
        _, late = await asyncio.wait(tasks, timeout=cfg.duration_s + PHASE_GRACE_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    for req in out:
        if req.end is None and req.error is None:
            req.error = f"unfinished {PHASE_GRACE_S:.0f}s after the phase's deadline"
    return t0, out


async def warm_up(cfg: LoadConfig, rounds: int = 2) -> int:
    """Every client sends short requests first, so compilation and first-batch effects stay out."""
    async with http_client(cfg) as http:
        failures = 0
        for r in range(rounds):
            done = await asyncio.gather(*[one_request(http, cfg, c, prompt_for(c, 1000 + r), 16)
                                          for c in range(cfg.clients)])
            failures += sum(not d.ok for d in done)
    return failures


# ---------------------------------------------------------------- statistics

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def tokens_in_window(requests: list[Request], t0: float, t1: float) -> float:
    """Completion tokens that arrived in [t0, t1]: each request's usage count spread over its chunks
    (a chunk may carry more than one token when the server coalesces outputs)."""
    total = 0.0
    for r in requests:
        if not r.token_times:
            continue
        per_chunk = (r.completion_tokens or len(r.token_times)) / len(r.token_times)
        total += per_chunk * sum(t0 <= t <= t1 for t in r.token_times)
    return total


def gaps(requests: list[Request]) -> list[tuple[float, float]]:
    """(start, end) of every gap between consecutive chunks of one stream."""
    return [(a, b) for r in requests for a, b in zip(r.token_times, r.token_times[1:])]


def load_requests(requests: list[Request]) -> list[Request]:
    return [r for r in requests if r.client != PROBE]


def phase_summary(t0: float, duration_s: float, requests: list[Request]) -> dict:
    probes = [r for r in requests if r.client == PROBE]
    requests = load_requests(requests)
    ok = [r for r in requests if r.ok]
    ttft = [r.token_times[0] - r.start for r in ok if r.token_times]
    total = [r.end - r.start for r in ok]
    gap_s = [b - a for a, b in gaps(ok)]
    errors: dict[str, int] = {}
    for r in requests:
        if r.error:
            errors[r.error[:120]] = errors.get(r.error[:120], 0) + 1
    return {
        "requests": len(requests), "failed_requests": len(requests) - len(ok), "errors": errors,
        "completion_tokens": sum(r.completion_tokens or 0 for r in ok),
        "completion_tokens_per_s": round(tokens_in_window(requests, t0, t0 + duration_s) / duration_s, 1),
        # all the work, including the requests still in flight at the deadline, over the time it took:
        # steadier than the window figure when a request lasts a large part of the window
        "completion_tokens_per_s_to_last_token": round(
            sum(r.completion_tokens or 0 for r in ok) / max(1e-9, max((r.end for r in ok), default=t0) - t0), 1),
        "mean_completion_tokens_per_request": round(sum(r.completion_tokens or 0 for r in ok) / max(1, len(ok)), 1),
        "ttft_ms": {"p50": _ms(percentile(ttft, 50)), "p99": _ms(percentile(ttft, 99))},
        "latency_ms": {"p50": _ms(percentile(total, 50)), "p99": _ms(percentile(total, 99))},
        "probe_requests": len(probes), "probe_failed_requests": sum(not r.ok for r in probes),
        "inter_token_gap_ms": {"p50": _ms(percentile(gap_s, 50)), "p99": _ms(percentile(gap_s, 99)),
                               "max": _ms(max(gap_s, default=None))},
    }


def max_gap_overlapping(requests: list[Request], t0: float, t1: float) -> float:
    """Longest gap between consecutive tokens of one stream that overlaps [t0, t1]."""
    return max((b - a for a, b in gaps(requests) if b >= t0 and a <= t1), default=0.0)


def global_silence(requests: list[Request], t0: float, t1: float) -> float:
    """Longest stretch inside [t0, t1] in which no stream received any token."""
    times = sorted(t for r in requests for t in r.token_times if t0 <= t <= t1)
    edges = [t0] + times + [t1]
    return max((b - a for a, b in zip(edges, edges[1:])), default=t1 - t0)


def dump(requests: list[Request], t0: float) -> list[dict]:
    """Per-request raw data (times relative to t0), to re-analyse a run without re-running it."""
    return [{"client": r.client, "start": round(r.start - t0, 3), "end": None if r.end is None else round(r.end - t0, 3),
             "token_times": [round(t - t0, 3) for t in r.token_times], "version": r.version,
             "completion_tokens": r.completion_tokens, "error": r.error} for r in requests]


def versions_served(requests: list[Request]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in requests:
        if r.ok:
            counts[r.version or "?"] = counts.get(r.version or "?", 0) + 1
    return dict(sorted(counts.items()))
