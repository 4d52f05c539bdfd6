"""Capacity over a long stream of tasks, from the planner alone: no model weights, no training.

For SmolLM2-135M's target matrices (shapes from var/base-models/SmolLM2-135M-Instruct/config.json when
present) it plans job after job as the worker does (worker/osft/constraint.py: `plan_matrices`, the
parent's k as the floor; `require_capacity` for a job that finds no room) and counts, per matrix, the
trainable directions: the rank an update may still have once the top k and the task memory's share are
protected (sculptor/capacity.py: `trainable_rank`). The memory is taken as saturated from the second
job on, i.e. it always fills its budget (memory_share of what k leaves on the input side): the worst
case, and what SmolLM2 shows, where one task's memory already holds 240-790 directions per matrix.

Policies (OSFTConfig):
  current     k grows with every task absorbed, unbounded (max_grown_ratio=1.0): the old default
  no-growth   the memory alone protects earlier tasks: k is the task's own ratio (remainder_decay=1)
  shipped     k grows up to max_grown_ratio (0.9) of m, or the task's own ratio when higher
  no-memory   task_memory off: unbounded growth, no memory
Scenarios: uniform (every matrix at the mean ratio 0.75) and adaptive (each task draws every layer's
importance at random, so the ratios spread over [0.5, 0.95] and the parent's floor ratchets).

    .venv/bin/python bench/bench_capacity.py [--tasks 1000] [--at 1 10 100 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, TARGETS, write_result  # noqa: E402

from sculptor.capacity import OSFTConfig, trainable_rank  # noqa: E402
from worker.osft.constraint import CapacityExhausted, plan_matrices, require_capacity  # noqa: E402

CONFIG = ROOT / "var" / "base-models" / "SmolLM2-135M-Instruct" / "config.json"
POLICIES = {
    "current": OSFTConfig(max_grown_ratio=1.0),
    "no-growth": OSFTConfig(remainder_decay=1.0),
    "shipped": OSFTConfig(),
    "no-memory": OSFTConfig(task_memory=False),
}


def smollm2_shapes() -> dict[str, tuple[int, int]]:
    """out × in of every target matrix, by module name."""
    c = json.loads(CONFIG.read_text()) if CONFIG.exists() else {}
    hidden, inter, layers = c.get("hidden_size", 576), c.get("intermediate_size", 1536), c.get("num_hidden_layers", 30)
    heads = c.get("num_attention_heads", 9)
    kv = c.get("num_key_value_heads", 3) * c.get("head_dim", hidden // heads)
    per_layer = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
                 "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
                 "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    return {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in per_layer.items()}


def simulate(shapes, config: OSFTConfig, tasks: int, at: list[int], adaptive: bool, seed: int) -> dict:
    rng = random.Random(seed)
    layers = sorted({int(name.split(".")[2]) for name in shapes})
    cfg = replace(config, adaptive_ranks=adaptive)
    record, rows, exhausted_at = None, {}, None
    for job in range(1, tasks + 1):
        importance = {layer: rng.uniform(0.6, 1.4) for layer in layers} if adaptive else {}
        plans = plan_matrices(shapes, importance, record, cfg)
        try:
            require_capacity(plans, cfg, job - 1)
        except CapacityExhausted:
            exhausted_at = exhausted_at or job  # every later job fails the same way: the lineage is stuck
        if job in at:
            rows[str(job)] = row(shapes, plans, cfg, memory=cfg.task_memory and job > 1, exhausted=exhausted_at)
        if exhausted_at is None:
            record = {"tasks": [None] * job, "matrices": {name: {"k": p.k} for name, p in plans.items()}}
    return {"exhausted_at_job": exhausted_at, "jobs": rows}


def row(shapes, plans, config: OSFTConfig, memory: bool, exhausted: int | None) -> dict:
    """Per matrix type: mean protected k, and the trainable directions (min and mean over layers)."""
    by_type: dict[str, list[tuple[int, int]]] = {t: [] for t in TARGETS}
    for name, plan in plans.items():
        shape = shapes[name]
        room = 0 if plan.spent or exhausted else trainable_rank(shape, plan.k, max(shape) if memory else 0,
                                                                 config.memory_share)
        by_type[name.rsplit(".", 1)[1]].append((plan.k, room))
    result = {t: {"k": round(sum(k for k, _ in v) / len(v), 1), "trainable_min": min(r for _, r in v),
                  "trainable_mean": round(sum(r for _, r in v) / len(v), 1)} for t, v in by_type.items()}
    result["spent_matrices"] = sum(plan.spent for plan in plans.values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--at", type=int, nargs="+", default=[1, 10, 100, 1000], help="jobs to report")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes = smollm2_shapes()
    result = {"model": "SmolLM2-135M-Instruct", "config_read": CONFIG.exists(), "matrices": len(shapes),
              "shapes": {t: next(s for n, s in shapes.items() if n.endswith(t)) for t in TARGETS},
              "policies": {name: {"max_grown_ratio": c.max_grown_ratio, "remainder_decay": c.remainder_decay,
                                  "task_memory": c.task_memory} for name, c in POLICIES.items()},
              "results": {f"{name}/{scenario}": simulate(shapes, config, args.tasks, args.at, scenario == "adaptive",
                                                         args.seed)
                          for name, config in POLICIES.items() for scenario in ("uniform", "adaptive")}}
    write_result("bench_capacity", result)


if __name__ == "__main__":
    main()
