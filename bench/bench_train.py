"""Training cost of the SVD-constrained method against plain full fine-tuning and PEFT's OSF.

Each method runs in its own subprocess (so peak RSS is its own) on SmolLM2-135M with the same
batch (by default the service's: 8 × 256 tokens) and the same target matrices and protected rank (uniform ratio, so PEFT's
`effective_rank` can match it): median step time after warmup, peak RSS, one-off SVD time,
registry load time. Each run also times its optimizer step (for the constrained method: AdamW plus
the projection), which gives an overhead ratio less exposed to other processes sharing the CPU.

    .venv/bin/python bench/bench_train.py [--steps 5] [--warmup 1] [--ratio 0.75] [--bf16] [--threads N]
        [--batch 32 --micro-batch 8]   # one update per batch of 32, forward and backward 8 rows at a time
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, TARGETS, base_model_dir, load_model, median, peak_rss_mb, write_result  # noqa: E402

METHODS = ["plain", "osft", "osft-registry", "peft-osf"]


def fixed_batch(vocab_size: int, batch: int, seq_len: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def build(method: str, model, args, registry):
    """(model, trainable parameters, optimizer, setup info) for one method."""
    from sculptor.datasets import Hyperparameters
    from worker.osft import OSFTConfig, build_constraint
    from worker.training.loop import adamw

    if method == "peft-osf":
        from peft import OSFConfig, get_peft_model

        started = time.monotonic()
        model = get_peft_model(model, OSFConfig(effective_rank=args.ratio, target_modules=TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, adamw(params, 1e-5, 0.0), {"setup_s": round(time.monotonic() - started, 2)}
    config = OSFTConfig(mean_protected_ratio=args.ratio, min_protected_ratio=min(0.5, args.ratio),
                        adaptive_ranks=False)
    hp = Hyperparameters(method="full" if method == "plain" else "osft")
    constraint = build_constraint(model, hp, "base", registry, [], config=config)
    report = constraint.report()
    info = {key: report[key] for key in ("svd_s", "load_s", "registry_hit", "protected_fraction") if key in report}
    return model, constraint.trainable_parameters(), constraint.make_optimizer(1e-5, 0.0), info


def run_method(method: str, args) -> dict:
    """One method's measurements (runs inside its own subprocess)."""
    import redis
    import torch

    from sculptor.storage import ObjectStore
    from worker.osft import SubspaceRegistry

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(base_model_dir())
    registry = None
    if method.startswith("osft"):
        registry = SubspaceRegistry(redis.Redis.from_url(args.redis_url, decode_responses=True),
                                    ObjectStore(Path(args.store).as_uri()))
    from worker.training.loop import micro_batches

    model, params, optimizer, info = build(method, model, args, registry)
    batch = fixed_batch(model.config.vocab_size, args.batch, args.seq_len)
    step_s, optimizer_s = [], []
    model.train()
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        for part, weight in micro_batches(batch, args.micro_batch):  # as the job's loop: one update per batch
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(**part).loss * weight
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        stepping = time.perf_counter()
        optimizer.step()  # the constrained optimizer includes the projection
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        if step >= args.warmup:
            step_s.append(done - started)
            optimizer_s.append(done - stepping)
    return {"method": method, "step_s": round(median(step_s), 3), "steps_s": [round(s, 3) for s in step_s],
            "optimizer_s": round(median(optimizer_s), 3), "peak_rss_mb": round(peak_rss_mb()),
            "trainable_parameters": sum(p.numel() for p in params), **info}


def spawn(method: str, args, redis_url: str, store: str) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--redis-url", redis_url, "--store", store,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--ratio", str(args.ratio),
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
               "--micro-batch", str(args.micro_batch or 0)] + (["--bf16"] if args.bf16 else [])
    print(f"[bench-train] {method} ...", file=sys.stderr, flush=True)
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.75, help="protected ratio k/m for osft and PEFT OSF")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256, help="default: the service's default_max_seq_len")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="rows per forward and backward, one update per batch (SCULPTOR_TRAIN_MICRO_BATCH; 0: all)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (slow on CPUs without AVX-512 BF16)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--name", default="bench_train", help="result file name under bench/results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_method(args.worker, args)))
        return

    from sculptor import redis_server

    base_model_dir()  # convert once, outside the timed subprocesses
    with tempfile.TemporaryDirectory() as tmp:
        proc, redis_url = redis_server.start_redis(Path(tmp) / "redis")
        try:
            runs = {m: spawn(m, args, redis_url, str(Path(tmp) / "store")) for m in args.methods.split(",")}
        finally:
            redis_server.stop(proc)
    write_result(args.name, summarise(runs, args))


def summarise(runs: dict[str, dict], args) -> dict:
    plain = runs.get("plain")
    result = {"model": "SmolLM2-135M-Instruct", "batch": args.batch, "micro_batch": args.micro_batch or None,
              "seq_len": args.seq_len,
              "protected_ratio": args.ratio, "bf16_autocast": args.bf16, "threads": args.threads, "steps": args.steps, "runs": runs}
    if plain:
        result["ratios_vs_plain"] = {
            method: {"step_time": round(run["step_s"] / plain["step_s"], 3),
                     "peak_rss": round(run["peak_rss_mb"] / plain["peak_rss_mb"], 3)}
            for method, run in runs.items() if method != "plain"}
    if plain:
        for method in ("osft", "osft-registry"):
            if method in runs:
                run = runs[method]
                # Forward/backward is the same work in both: the constrained optimizer step (AdamW plus
                # projection) against plain AdamW's, measured within each process, puts other load aside.
                extra = run["optimizer_s"] - plain["optimizer_s"]
                result.setdefault("projection_overhead", {})[method] = round(
                    run["step_s"] / (run["step_s"] - extra), 3)
    return result


if __name__ == "__main__":
    main()
