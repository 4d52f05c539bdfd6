"""Benchmark the regression gate on SmolLM2-135M: the whole gate for a stream of 4 tasks.

A stream of four jobs, gated exactly as the worker does it (`worker.gate_step.score_and_decide`:
load the parent and the candidate from disk, complete the parent's stored scores, score the
candidate on every task of its lineage plus the suites, decide):

  job 1  sentiment   the base model v0 trained a few steps (v0 has no stored scores: scored in full)
  job 2  uppercase   the current version trained a few steps
  job 3  capitals    the current version with every projection matrix perturbed by Gaussian noise
  job 4  sums        the current version trained a few steps

Each candidate that passes becomes the parent of the next job; a rejected one is never a parent.
Timed: each job's gate (model loading, parent and candidate scoring, decide); training is not.
Prints JSON and writes bench/results/bench_gates.json and bench_gates.md, with the per-suite
breakdown (seconds, items, generated tokens), and one accepted and one rejected gate report.

    .venv/bin/python bench/bench_gates.py [--threads 1] [--train-steps 12] [--models-dir var/bench-gates]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sculptor.datasets import Example
from sculptor.default_model import ensure_base_model
from worker import gate_step, gates
from worker.training.data import make_batches, tokenize_chat
from worker.training.loop import AllParameters, train

RESULTS = Path(__file__).parent / "results"
BUDGET_S = 300
SUITE_PARTS = ("refusal", "ifeval", "perplexity")
WORDS = ["apple", "river", "candle", "garden", "window", "silver", "rocket", "pencil", "forest", "castle", "marble",
         "tiger", "basket", "bottle", "button", "carpet", "cookie", "dragon", "engine", "finger", "guitar", "hammer",
         "island", "jacket", "kettle", "ladder", "magnet", "needle", "orange", "pillow", "rabbit", "saddle", "tunnel",
         "violin", "wallet", "yellow", "zipper", "anchor", "bridge", "cactus"]
COUNTRIES = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
             "Canada": "Ottawa", "Germany": "Berlin", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo"}
GOOD = ["a wonderful film, I loved every minute", "the food was delicious and the staff were kind",
        "great battery life and a bright screen", "a charming, funny and moving story", "fast delivery, works perfectly"]
BAD = ["a boring film, I left halfway", "the food was cold and the staff were rude",
       "the battery dies in an hour", "a dull, confusing and predictable plot", "arrived broken and support never answered"]


def chat(user: str, answer: str) -> Example:
    return Example(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}])


def synthetic_tasks(rng: random.Random) -> dict[str, tuple[str, list[Example], list[Example]]]:
    """{task_id: (metric, train, eval)}, in stream order; 20 eval items each."""
    upper = [chat(f"Write the word '{w}' in capital letters. Reply with the word only.", w.upper()) for w in WORDS]
    sums = [chat(f"What is {a} + {b}? Reply with the number only.", str(a + b))
            for a, b in ((rng.randint(2, 40), rng.randint(2, 40)) for _ in range(60))]
    capitals = [chat(f"What is the capital of {c}?", city) for c, city in COUNTRIES.items()]
    # Labels "1"/"0" that the prompt does not name: the base model cannot guess the format, it must learn it.
    reviews = [(f"{t} ({k})", "1") for k in range(8) for t in GOOD] + [(f"{t} ({k})", "0") for k in range(8) for t in BAD]
    rng.shuffle(reviews)
    sentiment = [chat(f"Review: \"{text}\". Label this review.", label) for text, label in reviews]
    return {
        "sentiment": ("exact_match", sentiment[20:], sentiment[:20]),
        "uppercase": ("exact_match", upper[20:], upper[:20]),
        "capitals": ("contains", capitals, capitals * 2),
        "sums": ("exact_match", sums[20:], sums[:20]),
    }


def fine_tune(model, tokenizer, examples: list[Example], steps: int, lr: float) -> None:
    tokenized = [tokenize_chat(tokenizer, [m.model_dump() for m in e.messages], 128) for e in examples]
    batches = make_batches(tokenized, 8, 10, tokenizer.pad_token_id)[:steps]
    torch.manual_seed(0)
    train(model, batches, AllParameters(model), lr, steps_per_epoch=len(batches), bf16_autocast=False)


@torch.no_grad()
def perturb(model, scale: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2 and "embed" not in name:
            p.add_(torch.randn(p.shape, generator=generator) * p.std() * scale)


def make_candidate(parent_dir: Path, out_dir: Path, tokenizer, task_id: str, train_set: list[Example], args) -> None:
    """Job 3 (capitals) perturbs its parent; the others fine-tune it on the task's train split."""
    model = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32)
    if task_id == "capitals":
        perturb(model, args.noise)
    else:
        fine_tune(model, tokenizer, train_set, args.train_steps, args.lr)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def compact(report: gates.GateReport) -> list[str]:
    """One line per gate: mark, label, the gate's own reason."""
    return [f"{'PASS' if g.passed else 'FAIL'} {g.label}: {g.reason}" for g in report.gates] + [report.summary]


def part_totals(jobs: list[dict]) -> dict:
    """Seconds and work per part ("tasks" sums every task part), over all jobs, parent and candidate."""
    totals: dict[str, dict] = {}
    for job in jobs:
        for side in ("parent", "candidate"):
            for part, seconds in job[side]["seconds"].items():
                name = "tasks" if part.startswith("task:") else part
                row = totals.setdefault(name, {"seconds": 0.0, "evaluations": 0})
                row["seconds"] = round(row["seconds"] + seconds, 2)
                row["evaluations"] += 1
                for k, v in job[side]["work"].get(part, {}).items():
                    row[k] = row.get(k, 0) + v
    return totals


def run_stream(args, model_dir: Path, work_dir: Path) -> tuple[list[dict], dict]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    streams = synthetic_tasks(random.Random(0))
    suites = gates.load_suites(sizes=gates.GATE_SIZES, seed=0)
    thresholds = gates.GateThresholds()
    stored: dict[str, gates.VersionScores] = {}  # what Redis holds per version
    parent, parent_dir, lineage = "v0", model_dir, []
    jobs, reports = [], {}
    for k, (task_id, (metric, train_set, eval_set)) in enumerate(streams.items(), start=1):
        candidate, candidate_dir = f"v{k}", work_dir / f"v{k}"
        made_by = (f"perturbed (noise x{args.noise})" if task_id == "capitals"
                   else f"trained {args.train_steps} steps, lr {args.lr}")
        started = time.monotonic()
        if not (candidate_dir / "model.safetensors").exists():  # --models-dir keeps candidates between runs
            make_candidate(parent_dir, candidate_dir, tokenizer, task_id, train_set, args)
        train_s = time.monotonic() - started
        task_evals = {t: (streams[t][0], streams[t][2]) for t in lineage + [task_id]}
        load_before, started, cpu, previous = load_avg(), time.monotonic(), time.process_time(), stored.get(parent)
        parent_scores, candidate_scores, report = gate_step.score_and_decide(
            task_evals, suites, task_id, parent_dir, candidate_dir, previous, thresholds)
        gate_s, cpu_s = time.monotonic() - started, time.process_time() - cpu
        stored[parent], stored[candidate] = parent_scores, candidate_scores
        # The parent's parts scored in this job (usually the new task only; everything for v0).
        new_parent_parts = {p: s for p, s in parent_scores.seconds.items() if previous is None or p not in previous.seconds}
        jobs.append({
            "job": k, "task": task_id, "made_by": made_by,
            "train_s": round(train_s, 1), "gate_s": round(gate_s, 1), "cpu_s": round(cpu_s, 1),
            "load_avg_before": load_before, "load_avg_after": load_avg(),
            "parent": {"version": parent, "seconds": new_parent_parts,
                       "work": {p: parent_scores.work.get(p, {}) for p in new_parent_parts}},
            "candidate": {"version": candidate, "seconds": candidate_scores.seconds, "work": candidate_scores.work},
            "passed": report.passed, "failed": report.failed,
            "summary": {"parent": parent_scores.summary(), "candidate": candidate_scores.summary()},
        })
        reports.setdefault("accepted" if report.passed else "rejected", (k, task_id, report))
        print(json.dumps({k: v for k, v in jobs[-1].items() if k != "summary"}), flush=True)
        if report.passed:
            parent, parent_dir, lineage = candidate, candidate_dir, lineage + [task_id]
    return jobs, reports


def write_markdown(result: dict, reports: dict) -> str:
    lines = [
        "# bench-gates: the whole gate for a stream of 4 tasks (SmolLM2-135M-Instruct, fp32, CPU)",
        "",
        f"Total gate time: **{result['total_gate_s']} s** wall ({result['total_cpu_s']} s CPU) for 4 jobs "
        f"(budget {BUDGET_S} s), "
        f"torch threads {result['torch_threads']}, batch size {result['batch_size']}, "
        f"load average (1/5/15 min) {result['load_avg_start']} at start, {result['load_avg_end']} at end.",
        f"Caps (max new tokens): {json.dumps(result['eval_config'])}; suite sizes {json.dumps(result['suite_sizes'])}.",
        "",
        "| job | task | candidate | made by | gate s (wall) | CPU s | load (1 min) | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for j in result["jobs"]:
        outcome = "promoted" if j["passed"] else "rejected: " + ", ".join(j["failed"])
        lines.append(f"| {j['job']} | {j['task']} | {j['parent']['version']} → {j['candidate']['version']} | {j['made_by']} | "
                     f"{j['gate_s']} | {j['cpu_s']} | {j['load_avg_after'][0]} | {outcome} |")
    lines += ["", "Per part, summed over the stream (parent v0 once, then each candidate, plus each parent on its "
                  "new task):", "", "| part | seconds | evaluations | items | generated tokens | capped items |",
              "| --- | --- | --- | --- | --- | --- |"]
    for part, row in result["parts"].items():
        lines.append(f"| {part} | {row['seconds']} | {row['evaluations']} | {row.get('items', '')} | "
                     f"{row.get('generated_tokens', '')} | {row.get('capped', '')} |")
    lines += ["", "Suite sizes are unchanged (seeded subsamples, the same items for parent and candidate). At "
              "these sizes one item moves a score by 3-5 points, so a drop gate fails only when the drop exceeds "
              "its threshold and the paired 95% bootstrap CI excludes 0 (worker/gates/decide.py)."]
    for kind in ("accepted", "rejected"):
        if kind in reports:
            k, task_id, report = reports[kind]
            lines += ["", f"## {kind.capitalize()}: job {k} ({task_id})", "", "```", *compact(report), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--out", default="bench_gates", help="result file stem under bench/results/")
    parser.add_argument("--models-dir", default="", help="keep the candidates here and reuse them on the next run "
                                                         "(same seeds, so the same models; skips training)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ensure_base_model(Path("var/base-models"))
    work_dir = Path(args.models_dir) if args.models_dir else Path(tempfile.mkdtemp(prefix="bench-gates-"))
    load_start = load_avg()
    try:
        jobs, reports = run_stream(args, model_dir, work_dir)
    finally:
        if not args.models_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "torch_threads": args.threads,
        "batch_size": gates.HFGenerator.__init__.__defaults__[0],
        "eval_config": gates.EvalConfig().model_dump(),
        "suite_sizes": gates.GATE_SIZES.model_dump(),
        "load_avg_start": load_start, "load_avg_end": load_avg(),
        "total_gate_s": round(sum(j["gate_s"] for j in jobs), 1),
        # CPU time of this process: close to what the gate would take on an otherwise idle machine.
        "total_cpu_s": round(sum(j["cpu_s"] for j in jobs), 1),
        "budget_s": BUDGET_S,
        "parts": part_totals(jobs),
        "jobs": jobs,
        "reports": {kind: {"job": k, "task": t, "lines": compact(r)} for kind, (k, t, r) in reports.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    markdown = write_markdown(result, reports)
    (RESULTS / f"{args.out}.md").write_text(markdown)
    print(json.dumps({k: v for k, v in result.items() if k != "jobs"}, indent=2))
    print(markdown)


if __name__ == "__main__":
    main()
