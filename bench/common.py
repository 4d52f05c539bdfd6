"""Helpers shared by the benchmarks: the default model, peak memory, JSON results."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model_dir() -> Path:
    from sculptor.default_model import ensure_base_model

    return ensure_base_model(ROOT / "var" / "base-models")


def load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


@contextmanager
def pipeline_context(model_dir: Path):
    """A Context for in-process jobs (worker/pipeline.py: run_job): a fresh Redis and object store, v0 = model_dir."""
    from sculptor import redis_server
    from sculptor.bootstrap import ensure_initial_version
    from sculptor.config import Settings
    from sculptor.context import Context

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = redis_server.start_redis(Path(tmp) / "redis")
        try:
            settings = Settings(var_dir=Path(tmp) / "var", redis_url=url, base_model_dir=str(model_dir))
            ctx = Context.from_settings(settings)
            ensure_initial_version(settings, ctx.redis, ctx.store)
            yield ctx
        finally:
            redis_server.stop(proc)


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_result(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    (RESULTS / f"{name}.json").write_text(text + "\n")
    print(text)
