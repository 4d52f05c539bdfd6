"""`make bench-serving`: streaming throughput and latency, vLLM's own server vs the Sculptor gateway,
with three hot-swaps in each gateway window.

"direct": vLLM's OpenAI server on loopback; "gateway": `python -m deploy.run` (Redis, worker, gateway with
its in-process vLLM engine). Both are started first and stay up; then 32 concurrent streaming chat
clients load one of them for 60 s at a time, in the order direct, gateway, gateway, direct (ABBA).
Why: this machine's speed drifts by more than the effect measured (the direct server alone did 423, 363
and 289 tok/s in three runs within a day), and the ABBA order cancels a drift that is linear in time.
In each gateway window three promotions (perturbed copies of v0, published before the windows) are
made at ~15/30/45 s through `VersionStore.promote`, the worker's own promotion path.
The ratio is the gateway windows' tokens over the direct windows'.

`--replicas N` puts N engine replicas behind the gateway (rolling swaps, one replica at a time).
The candidates are announced on the candidates channel before the window, as the worker does when it
saves one (gateways prefetch them while they are gated); the promotions come later.

Writes the report to stdout and bench/results/bench_serving[_rN].json; logs go to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import serving_clients as sc  # noqa: E402

RESULTS = REPO / "bench" / "results"
CLIENTS, MAX_TOKENS, TEMPERATURE = 32, 64, 0.7
DURATION_S = float(os.environ.get("BENCH_SERVING_DURATION_S", "60"))  # shorter only for a smoke run
SWAP_AT_S = tuple(round(DURATION_S * f, 1) for f in (0.25, 0.5, 0.75))  # 15, 30, 45 s
SWAP_WINDOW_AFTER_S = 1.0  # the stall window runs from promote() to the new version's first token + this
START_TIMEOUT_S = 900
COMMON_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def log(msg: str) -> None:
    print(f"[bench-serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    from sculptor.redis_server import free_port as _free

    return _free()


def load_snapshot() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def sample_load(every_s: float, until: float, out: list[float]) -> None:
    while time.monotonic() < until:
        out.append(round(os.getloadavg()[0], 2))
        await asyncio.sleep(every_s)


# ---------------------------------------------------------------- processes

def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {timeout_s}s")


def stop_process(proc: subprocess.Popen, sig: int, what: str, timeout_s: float = 60) -> None:
    """Signal our child; if it lingers, kill its process group (it was started in its own session)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log(f"{what} did not stop in {timeout_s}s; killing its process group")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log(f"{what} stopped (code {proc.returncode})")


def spawn(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    with log_path.open("w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def keep_log_tail(src: Path, name: str, lines: int = 300) -> None:
    text = src.read_text(errors="replace").splitlines()[-lines:] if src.exists() else []
    (RESULTS / name).write_text("\n".join(text) + "\n")


# ---------------------------------------------------------------- the two servers

WINDOWS = ("direct", "gateway", "gateway", "direct")


@asynccontextmanager
async def direct_server(model_dir: Path, tmp: Path):
    """vLLM's own OpenAI server; yields the load config that targets it."""
    port = free_port()
    env = dict(os.environ, **COMMON_ENV)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", "smollm", "--dtype", "bfloat16", "--max-model-len", "2048",
           "--max-num-seqs", str(CLIENTS), "--seed", "0", "--host", "127.0.0.1", "--port", str(port)]
    log_path = tmp / "vllm-direct.log"
    proc = spawn(cmd, env, log_path)
    started = time.monotonic()
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, START_TIMEOUT_S, "vLLM's server")
        log(f"direct: vLLM server ready in {time.monotonic() - started:.0f}s")
        yield sc.LoadConfig(f"http://127.0.0.1:{port}", "smollm", CLIENTS, DURATION_S, MAX_TOKENS, TEMPERATURE)
    finally:
        stop_process(proc, signal.SIGTERM, "vLLM server")
        keep_log_tail(log_path, "bench_serving_direct.log")


async def measure(cfg: sc.LoadConfig, name: str, during=None) -> dict:
    warm_failures = await sc.warm_up(cfg)
    load_at_start, samples = load_snapshot(), []
    log(f"{name}: load average {load_at_start}; {cfg.clients} clients for {cfg.duration_s:.0f}s")
    sampler = asyncio.create_task(sample_load(5.0, time.monotonic() + cfg.duration_s, samples))
    t0, requests = await sc.run_load(cfg, during)
    await sampler
    summary = sc.phase_summary(t0, cfg.duration_s, requests)
    summary |= {"warmup_failed_requests": warm_failures, "load_average_at_start": load_at_start,
                "load_average_1m_samples": samples}
    log(f"{name}: {summary['requests']} requests, {summary['failed_requests']} failed, "
        f"{summary['completion_tokens_per_s']} tok/s")
    return {"summary": summary, "t0": t0, "requests": requests}


def perturbed_copy(v0_dir: Path, out_dir: Path, seed: int) -> None:
    """v0 with small noise on every projection matrix: what a constrained job changes (SmolLM2 v0 -> v1 of
    `make run`: the 210 q/k/v/o/gate/up/down matrices; the embeddings and norms stay as they were)."""
    import torch
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True)
    for p in v0_dir.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copy(p, out_dir / p.name)
    gen = torch.Generator().manual_seed(seed)
    for st in v0_dir.glob("*.safetensors"):
        tensors = load_file(st)
        for name, w in tensors.items():
            if name.endswith("_proj.weight"):
                w += torch.randn(w.shape, generator=gen, dtype=w.dtype) * (0.02 * w.std())
        save_file(tensors, out_dir / st.name, metadata={"format": "pt"})


def publish_perturbed(settings, v0_dir: Path, tmp: Path) -> dict[str, str]:
    """v1..v3 in the stack's object store before the window (the swap itself still fetches them)."""
    from sculptor import checkpoints
    from sculptor.storage import open_store

    store, uris = open_store(settings), {}
    for i in range(1, len(SWAP_AT_S) * WINDOWS.count("gateway") + 1):
        local = tmp / f"perturbed-v{i}"
        perturbed_copy(v0_dir, local, seed=i)
        uris[f"v{i}"] = checkpoints.publish_dir(store, local, f"v{i}")
        shutil.rmtree(local)
    return uris


def announce_candidates(redis_url: str, versions: list[str]) -> None:
    """What the worker publishes when it saves a candidate (worker/pipeline.py): gateways prefetch it."""
    from sculptor.records import CANDIDATES_CHANNEL, connect

    client = connect(redis_url)
    for version in versions:
        client.publish(CANDIDATES_CHANNEL, json.dumps({"version": version}))


async def promote_on_schedule(redis_url: str, uris: dict[str, str], parent: str, t0: float, promoted: dict) -> None:
    from sculptor.records import ModelVersion, VersionStore, connect

    versions = VersionStore(connect(redis_url))
    for (name, uri), at in zip(uris.items(), SWAP_AT_S):
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        promoted[name] = time.monotonic()
        versions.promote(ModelVersion(version=name, parent=parent, checkpoint_uri=uri))  # what the worker does
        log(f"gateway: promoted {name} at t+{promoted[name] - t0:.1f}s")
        parent = name


@dataclass
class GatewayStack:
    cfg: sc.LoadConfig
    port: int
    redis_url: str
    uris: dict[str, str]  # the versions to promote, in order, three per gateway window
    serving: str = "v0"


@asynccontextmanager
async def gateway_stack(v0_dir: Path, tmp: Path, replicas: int, swaps: list[dict]):
    """The Sculptor stack serving v0, with the candidates published and announced; yields a GatewayStack.
    On exit, the gateway's own account of each swap is appended to `swaps`."""
    from sculptor.config import Settings

    var, port, redis_port = tmp / "var", free_port(), free_port()
    env = dict(os.environ, **COMMON_ENV, SCULPTOR_VAR_DIR=str(var), SCULPTOR_PORT=str(port),
               SCULPTOR_EMBEDDED_REDIS_PORT=str(redis_port), SCULPTOR_BASE_MODEL_DIR=str(v0_dir),
               SCULPTOR_ENGINE="vllm", SCULPTOR_ENGINE_MAX_MODEL_LEN="2048",
               SCULPTOR_ENGINE_MAX_NUM_SEQS=str(CLIENTS), SCULPTOR_HOST="127.0.0.1",
               SCULPTOR_ENGINE_REPLICAS=str(replicas))
    for key in ("REDIS_URL", "SCULPTOR_OBJECT_STORE_URL", "SCULPTOR_API_KEYS"):
        env.pop(key, None)
    settings = Settings(var_dir=var, object_store_url="", redis_url="")
    uris = publish_perturbed(settings, v0_dir, tmp)
    log(f"gateway: published {list(uris)}; starting the stack")
    log_path = tmp / "sculptor.log"
    proc = spawn([sys.executable, "-m", "deploy.run"], env, log_path)
    started = time.monotonic()
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, START_TIMEOUT_S, "the Sculptor stack")
        log(f"gateway: ready in {time.monotonic() - started:.0f}s ({replicas} engine replicas)")
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        announce_candidates(redis_url, list(uris))
        cfg = sc.LoadConfig(f"http://127.0.0.1:{port}", "current", CLIENTS, DURATION_S, MAX_TOKENS, TEMPERATURE)
        yield GatewayStack(cfg, port, redis_url, uris)
    finally:
        stop_process(proc, signal.SIGINT, "deploy.run")
        keep_log_tail(log_path, f"bench_serving_gateway{'' if replicas == 1 else f'_r{replicas}'}.log", 900)
        swaps.extend(gateway_swap_log(log_path.read_text(errors="replace") if log_path.exists() else ""))


async def gateway_window(stack: GatewayStack) -> dict:
    """One window of load on the gateway, with the next three promotions in it."""
    done = list(stack.uris).index(stack.serving) + 1 if stack.serving in stack.uris else 0
    batch = dict(list(stack.uris.items())[done:done + len(SWAP_AT_S)])
    promoted: dict[str, float] = {}
    result = await measure(stack.cfg, "gateway",
                           lambda t0: promote_on_schedule(stack.redis_url, batch, stack.serving, t0, promoted))
    result |= {"promoted": promoted, "serving_before": stack.serving,
               "lineage": httpx.get(f"http://127.0.0.1:{stack.port}/models", timeout=10).json()}
    stack.serving = list(batch)[-1]
    return result


def gateway_swap_log(text: str) -> list[dict]:
    """The gateway's own account of each swap ("now serving vN (fetch Xs, stall Ys, lock wait ...)")."""
    pattern = re.compile(r"now serving (v\d+) \(fetch ([\d.]+)s, stall ([\d.]+)s, lock wait ([\d.]+)s, "
                         r"drain ([\d.]+)s, pause ([\d.]+)s, reload ([\d.]+)s, \d+ replicas, (\d+) tensors changed")
    keys = ("fetch_s", "stall_s", "lock_wait_s", "drain_s", "pause_s", "reload_s", "changed_tensors")
    return [{"version": v, **dict(zip(keys, map(float, rest)))} for v, *rest in pattern.findall(text)]


# ---------------------------------------------------------------- swap analysis

def first_token_of(requests: list[sc.Request], version: str, after: float) -> float | None:
    times = [t for r in requests for t, v in zip(r.token_times, r.versions) if v == version and t >= after]
    return min(times, default=None)


def resume_time(requests: list[sc.Request], t0: float, t1: float) -> float | None:
    """End of the longest stretch in [t0, t1] with no token on any stream: where the engine resumed."""
    times = sorted(t for r in requests for t in r.token_times if t0 <= t <= t1)
    edges = [t0] + times
    if len(edges) < 2:
        return None
    return max(zip(edges, edges[1:]), key=lambda ab: ab[1] - ab[0])[1]


def swap_report(requests: list[sc.Request], version: str, old: str, promoted_at: float, t0: float,
                median_gap: float) -> dict:
    ok = [r for r in requests if r.ok]
    first_new = first_token_of(ok, version, promoted_at)
    first_new_load = first_token_of(sc.load_requests(ok), version, promoted_at)
    window_end = (first_new or promoted_at + 15.0) + SWAP_WINDOW_AFTER_S
    stall = sc.max_gap_overlapping(ok, promoted_at, window_end)
    silence = sc.global_silence(ok, promoted_at, window_end)
    resumed = resume_time(ok, promoted_at, window_end)
    old_after = [r for r in ok if r.version == old and resumed and r.token_times[-1] > resumed]
    return {
        "version": version, "promoted_at_s": round(promoted_at - t0, 2),
        "promote_to_first_new_token_ms": _ms_since(promoted_at, first_new),
        "promote_to_first_new_token_load_clients_ms": _ms_since(promoted_at, first_new_load),
        "max_stream_gap_in_window_ms": round(stall * 1000, 1),
        "max_stream_gap_vs_median_gap": round(stall / median_gap, 1) if median_gap else None,
        "global_silence_in_window_ms": round(silence * 1000, 1),
        "old_label_requests_streaming_after_resume": len(old_after),
        "old_label_requests_entirely_after_resume": sum(r.token_times[0] > resumed for r in old_after),
    }


def _ms_since(t0: float, t: float | None) -> float | None:
    return None if t is None else round((t - t0) * 1000, 1)


def swaps_report(gateway: dict) -> list[dict]:
    reqs, t0 = gateway["requests"], gateway["t0"]
    median_gap = (gateway["summary"]["inter_token_gap_ms"]["p50"] or 0) / 1000
    out, old = [], gateway["serving_before"]
    for version, at in gateway["promoted"].items():
        out.append(swap_report(reqs, version, old, at, t0, median_gap))
        old = version
    return out


def gap_outside_swaps(gateway: dict, swaps: list[dict]) -> float:
    """Max stream gap in the gateway phase away from the swap windows: the jitter baseline."""
    t0, windows = gateway["t0"], []
    for s in swaps:
        start = t0 + s["promoted_at_s"]
        end = start + (s["promote_to_first_new_token_ms"] or 15000) / 1000 + SWAP_WINDOW_AFTER_S
        windows.append((start, end))
    ok = [r for r in gateway["requests"] if r.ok]
    return max((b - a for a, b in sc.gaps(ok) if all(b < s or a > e for s, e in windows)), default=0.0)


def late_labels(gateway: dict) -> int:
    """Requests started after a version's first new token that still carry an older version."""
    order = [gateway["serving_before"], *gateway["promoted"]]
    reqs = [r for r in sc.load_requests(gateway["requests"]) if r.ok]
    wrong = 0
    for i, version in enumerate(order[1:], start=1):
        first = first_token_of(reqs, version, gateway["promoted"][version])
        if first is not None:
            wrong += sum(r.start > first and r.version in order[:i] for r in reqs)
    return wrong


# ---------------------------------------------------------------- report

def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def gateway_report(gateway: dict) -> dict:
    swaps = swaps_report(gateway)
    return gateway["summary"] | {
        "versions_served": sc.versions_served(sc.load_requests(gateway["requests"])),
        "versions_served_probe": sc.versions_served([r for r in gateway["requests"] if r.client == sc.PROBE]),
        "requests_started_after_swap_with_old_label": late_labels(gateway),
        "max_stream_gap_outside_swaps_ms": round(gap_outside_swaps(gateway, swaps) * 1000, 1),
        "serving_at_end": gateway.get("lineage", {}).get("serving"), "swaps": swaps}


def pooled(summaries: list[dict], key: str) -> float:
    return sum(s[key] for s in summaries) / len(summaries)


def report(windows: list[tuple[str, dict]], gateway_swaps: list[dict], replicas: int) -> dict:
    direct = [w["summary"] for name, w in windows if name == "direct"]
    gateway = [gateway_report(w) for name, w in windows if name == "gateway"]
    pairs = [(g, d) for g, d in zip(gateway, direct)]  # (G1, D1) and (G2, D2): the drift within the run
    return {
        "setup": {"model": "SmolLM2-135M-Instruct (bf16)", "engine_replicas": replicas, "clients": CLIENTS,
                  "duration_s": DURATION_S, "windows": list(WINDOWS),
                  "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE, "max_num_seqs": CLIENTS,
                  "kv_cache_gib": COMMON_ENV["VLLM_CPU_KVCACHE_SPACE"], "cpus": os.cpu_count(),
                  "swaps_at_s": list(SWAP_AT_S), "when": time.strftime("%Y-%m-%d %H:%M:%S")},
        "direct": direct,
        "gateway": gateway,
        "gateway_swap_log": gateway_swaps,
        "gateway_over_direct_tokens_per_s": _ratio(pooled(gateway, "completion_tokens_per_s"),
                                                   pooled(direct, "completion_tokens_per_s")),
        "gateway_over_direct_tokens_per_s_to_last_token": _ratio(
            pooled(gateway, "completion_tokens_per_s_to_last_token"),
            pooled(direct, "completion_tokens_per_s_to_last_token")),
        "window_pair_ratios": [_ratio(g["completion_tokens_per_s"], d["completion_tokens_per_s"]) for g, d in pairs],
        "failed_requests": sum(s["failed_requests"] for s in direct + gateway),
        "goals": {"failed_requests": 0, "tokens_per_s_ratio": 0.97, "promote_to_first_new_token_ms": 1000},
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1], metavar="N",
                        help="engine replicas behind the gateway (default 1); several values run one gateway "
                             "stack each, each compared with its own direct windows")
    return parser.parse_args()


def write_results(windows: list[tuple[str, dict]], gateway_swaps: list[dict], replicas: int) -> dict:
    out = report(windows, gateway_swaps, replicas)
    suffix = "" if replicas == 1 else f"_r{replicas}"
    (RESULTS / f"bench_serving{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")
    raw = [{"window": name, "requests": sc.dump(w["requests"], w["t0"]),
            "promoted_at_s": {v: round(t - w["t0"], 3) for v, t in w.get("promoted", {}).items()}}
           for name, w in windows]
    (RESULTS / f"bench_serving{suffix}_requests.json").write_text(json.dumps(raw) + "\n")
    return out


async def run_windows(direct_cfg: sc.LoadConfig, stack: GatewayStack) -> list[tuple[str, dict]]:
    windows = []
    for name in WINDOWS:
        windows.append((name, await (measure(direct_cfg, "direct") if name == "direct" else gateway_window(stack))))
    return windows


async def main(args: argparse.Namespace) -> int:
    from sculptor.default_model import ensure_base_model

    RESULTS.mkdir(parents=True, exist_ok=True)
    v0_dir = ensure_base_model(REPO / "var" / "base-models")
    reports = []
    with tempfile.TemporaryDirectory(prefix="sculptor-bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        async with direct_server(v0_dir, tmp) as direct_cfg:
            for replicas in args.replicas:
                (tmp / f"r{replicas}").mkdir()
                swaps: list[dict] = []
                async with gateway_stack(v0_dir, tmp / f"r{replicas}", replicas, swaps) as stack:
                    windows = await run_windows(direct_cfg, stack)
                reports.append(write_results(windows, swaps, replicas))
    print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
