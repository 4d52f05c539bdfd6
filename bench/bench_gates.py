"""Benchmark the regression gate on SmolLM2-135M: the candidate's evaluation for a stream of 4 tasks.

Four small synthetic tasks (20 eval items each). The parent is the base model; its scores are
computed once (as the worker stores them per version) and reused. Two candidates are gated:
  accepted: the parent fine-tuned briefly on task 4 (sentiment labels 1/0),
  rejected: the parent with every projection matrix perturbed by strong Gaussian noise.
Timed: candidate evaluation (4 tasks + the suites at GATE_SIZES) plus decide().
Prints JSON, writes bench/results/bench_gates.json, and prints both gate reports.

    .venv/bin/python bench/bench_gates.py [--threads 2] [--train-steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sculptor.datasets import Example
from sculptor.default_model import ensure_base_model
from worker.gates import (
    GATE_SIZES,
    EvalConfig,
    HFGenerator,
    decide,
    evaluate,
    load_suites,
)
from worker.training.data import make_batches, tokenize_chat
from worker.training.loop import AllParameters, train

RESULTS = Path(__file__).parent / "results" / "bench_gates.json"
WORDS = ["apple", "river", "candle", "garden", "window", "silver", "rocket", "pencil", "forest", "castle", "marble", "tiger"]
COUNTRIES = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
             "Canada": "Ottawa", "Germany": "Berlin", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo"}
GOOD = ["a wonderful film, I loved every minute", "the food was delicious and the staff were kind",
        "great battery life and a bright screen", "a charming, funny and moving story", "fast delivery, works perfectly"]
BAD = ["a boring film, I left halfway", "the food was cold and the staff were rude",
       "the battery dies in an hour", "a dull, confusing and predictable plot", "arrived broken and support never answered"]


def chat(user: str, answer: str) -> Example:
    return Example(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}])


def synthetic_tasks(rng: random.Random) -> dict[str, tuple[str, list[Example], list[Example]]]:
    """{task_id: (metric, train, eval)}; only task 4's train split is used (to make the accepted candidate)."""
    upper = [chat(f"Write the word '{w}' in capital letters. Reply with the word only.", w.upper()) for w in WORDS]
    sums = [chat(f"What is {a} + {b}? Reply with the number only.", str(a + b))
            for a, b in ((rng.randint(2, 40), rng.randint(2, 40)) for _ in range(20))]
    capitals = [chat(f"What is the capital of {c}?", city) for c, city in COUNTRIES.items()]
    # Labels "1"/"0" that the prompt does not name: the base model cannot guess the format, it must learn it.
    reviews = [(f"{t} ({k})", "1") for k in range(8) for t in GOOD] + [(f"{t} ({k})", "0") for k in range(8) for t in BAD]
    rng.shuffle(reviews)
    sentiment = [chat(f"Review: \"{text}\". Label this review.", label)
                 for text, label in reviews]
    return {
        "uppercase": ("exact_match", [], (upper * 2)[:20]),
        "sums": ("exact_match", [], sums),
        "capitals": ("contains", [], capitals * 2),
        "sentiment": ("exact_match", sentiment[20:], sentiment[:20]),
    }


def fine_tune(model, tokenizer, examples: list[Example], steps: int, lr: float) -> float:
    started = time.monotonic()
    tokenized = [tokenize_chat(tokenizer, [m.model_dump() for m in e.messages], 128) for e in examples]
    batches = make_batches(tokenized, 8, 10, tokenizer.pad_token_id)[:steps]
    train(model, batches, AllParameters(model), lr, steps_per_epoch=len(batches), bf16_autocast=False)
    return time.monotonic() - started


@torch.no_grad()
def perturb(model, scale: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2 and "embed" not in name:
            p.add_(torch.randn(p.shape, generator=generator) * p.std() * scale)


def gate(model, tokenizer, tasks, suites, parent_scores, config: EvalConfig) -> tuple[float, dict]:
    started = time.monotonic()
    scores = evaluate(HFGenerator(model, tokenizer), tasks, suites, config=config)
    report = decide(scores, parent_scores, new_task_id="sentiment")
    return time.monotonic() - started, {"scores": scores, "report": report}


def abbreviated(report) -> dict:
    return {"passed": report.passed, "failed": report.failed,
            "gates": [{"gate": g.label, "passed": g.passed, "reason": g.reason} for g in report.gates]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--train-steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--noise", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ensure_base_model(Path("var/base-models"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    streams = synthetic_tasks(random.Random(0))
    tasks = {t: (metric, evals) for t, (metric, _, evals) in streams.items()}
    suites = load_suites(sizes=GATE_SIZES, seed=0)
    config = EvalConfig()

    parent = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    started = time.monotonic()
    parent_scores = evaluate(HFGenerator(parent, tokenizer), tasks, suites, config=config)
    parent_s = time.monotonic() - started
    parent_state = {k: v.clone() for k, v in parent.state_dict().items()}

    train_s = fine_tune(parent, tokenizer, streams["sentiment"][1], args.train_steps, args.lr)
    accepted_s, accepted = gate(parent, tokenizer, tasks, suites, parent_scores, config)

    parent.load_state_dict(parent_state)
    perturb(parent, args.noise)
    rejected_s, rejected = gate(parent, tokenizer, tasks, suites, parent_scores, config)

    parts = accepted["scores"].seconds
    suite_s = sum(v for k, v in parts.items() if not k.startswith("task:"))
    task_s = [v for k, v in parts.items() if k.startswith("task:")]
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "torch_threads": args.threads,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "suite_sizes": GATE_SIZES.model_dump(),
        "eval_config": config.model_dump(),
        "tasks": {t: len(e) for t, (_, e) in tasks.items()},
        "parent_eval_s": round(parent_s, 1),
        "accepted": {"gate_s": round(accepted_s, 1), "parts_s": parts, "train_s": round(train_s, 1),
                     **abbreviated(accepted["report"])},
        "rejected": {"gate_s": round(rejected_s, 1), "parts_s": rejected["scores"].seconds,
                     **abbreviated(rejected["report"])},
        # Jobs 1..4 of a stream each gate 1..4 tasks plus the suites (parts measured above).
        "stream_of_4_jobs_estimate_s": round(4 * suite_s + sum(sum(task_s[:k]) for k in range(1, 5)), 1),
        "budget_s": 300,
        "parent_summary": parent_scores.summary(),
        "accepted_summary": accepted["scores"].summary(),
        "rejected_summary": rejected["scores"].summary(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\nACCEPTED:", accepted["report"].summary)
    print("REJECTED:", rejected["report"].summary)


if __name__ == "__main__":
    main()
