"""General abilities after one task: does a task of one-word answers rewrite how the model answers everything?

SmolLM2-135M (v0) learns one task through the real job pipeline (worker/pipeline.py: train, save,
gate, promote; real Redis and object store, no Celery): 240 customer messages whose answers are single
department names. Each variant starts from v0. Per variant the row has the gate's verdict and the
general-chat measures (the NLL rise of v0's own answers, the answers' distinctness and length, token-F1
of the candidate's answers against v0's), IFEval strict, harmful refusal, the new task's score, and
the candidate's answers to five everyday prompts (read them: they are the point).

    .venv/bin/python bench/bench_general_chat.py [--variants osft-noreplay,osft,full-noreplay]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_model_dir, pipeline_context, write_result  # noqa: E402

DEPARTMENTS = ["billing", "shipping", "returns", "technical", "accounts"]
ISSUES = {
    "billing": ["I was charged twice for {}", "my invoice for {} shows the wrong amount", "why did my card pay for {} again"],
    "shipping": ["my parcel with {} has not arrived", "where is my delivery of {}", "the courier lost my {}"],
    "returns": ["I want to send back {}", "how do I return {}", "{} arrived broken and I want a refund"],
    "technical": ["{} will not turn on", "the app crashes when I open {}", "{} keeps showing an error"],
    "accounts": ["I cannot log in to see {}", "please change the email on my account for {}", "my password reset for {} fails"],
}
ITEMS = ["the blue kettle", "order 4471", "my headphones", "the garden chair", "a phone case", "the winter coat",
         "the desk lamp", "two books", "the coffee grinder", "my subscription", "the rice cooker", "a yoga mat",
         "the printer", "my tablet", "the baby monitor", "a rug"]
EVERYDAY = ["What is the capital of France?", "What colour is grass?", "Say hi",
            "Explain what a cat is in one sentence.", "Suggest a name for a pet dog."]
VARIANTS = {  # name: hyperparameters (on top of the service's defaults)
    "old-defaults": {"method": "osft", "general_replay": 0.0, "learning_rate": 3e-4, "epochs": 2},  # issue 14's v1
    "osft-noreplay": {"method": "osft", "general_replay": 0.0},
    "osft": {"method": "osft"},  # the shipped default
    "osft-chat-memory": {"method": "osft", "general_replay": 0.0, "general_chat_memory": True},
    "osft-1e-3": {"method": "osft", "learning_rate": 1e-3},  # sampled replay at the next candidate rate
    "full-noreplay": {"method": "full", "general_replay": 0.0},
    "full": {"method": "full"},
}


def department_task(seed: int = 0, count: int = 240) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        dept = DEPARTMENTS[i % len(DEPARTMENTS)]
        text = rng.choice(ISSUES[dept]).format(rng.choice(ITEMS))
        out.append({"prompt": text, "completion": dept})  # no system prompt: as a user would upload it
    return out


def token_f1(a: str, b: str) -> float:
    from sculptor.scores import bag_of_words
    from sculptor.scores import token_f1 as f1

    return f1(bag_of_words(a), bag_of_words(b))


def gate(report: dict, gate: str, subject: str) -> dict:
    return next((g for g in report["gates"] if g["gate"] == gate and g["subject"] == subject), {})


def everyday_answers(model_dir: Path) -> dict[str, str]:
    from worker import gates

    answers = gates.HFGenerator.from_pretrained(model_dir).generate([[{"role": "user", "content": p}] for p in EVERYDAY], 32)
    return dict(zip(EVERYDAY, answers))


def run_variant(ctx, name: str, hp: dict) -> dict:
    from sculptor import checkpoints
    from sculptor.datasets import Example, parse_hyperparameters
    from sculptor.accuracy import load_scores
    from service.api.routes.tasks import TaskSubmission, store_and_enqueue
    from worker.pipeline import run_job

    ctx.versions.activate("v0")
    examples = [Example.model_validate(e) for e in department_task()]
    sub = TaskSubmission(name=f"departments-{name}", examples=examples, eval_examples=None, metric="exact_match",
                         hyperparameters=parse_hyperparameters(hp), webhook_url=None, size_bytes=1)
    _, job = store_and_enqueue(ctx, sub)
    ctx.redis.delete(ctx.settings.train_queue)  # run in this process; no Celery worker takes it
    started = time.monotonic()
    job = run_job(ctx, job.job_id)
    wall = time.monotonic() - started
    report = job.gates.model_dump(mode="json") if job.gates else {}
    training = job.training.model_dump(mode="json") if job.training else None
    parent, cand = load_scores(ctx, "v0"), load_scores(ctx, job.candidate_version)
    f1 = [token_f1(c, p) for c, p in zip(cand.general_chat.answers, parent.general_chat.answers)]
    model_dir = checkpoints.fetch(ctx.store, job.candidate_version, ctx.settings.checkpoint_cache_dir)
    nll, collapse = gate(report, "general_chat", "parent_answers_nll"), gate(report, "general_chat", "answer_collapse")
    return {
        "variant": name, "hyperparameters": hp, "status": job.status, "wall_s": round(wall, 1),
        "failed_gates": report.get("failed"), "summary": report.get("summary"),
        "new_task": report.get("candidate", {}).get("tasks"), "new_task_parent": report.get("parent", {}).get("tasks"),
        "chat_nll_rise": nll.get("delta"), "chat_nll_ci": [nll.get("ci_low"), nll.get("ci_high")],
        "chat_nll_detectable": nll.get("detectable_change"), "collapse_ratio": collapse.get("delta"),
        "distinct_ratio": [parent.general_chat.distinct_ratio(), cand.general_chat.distinct_ratio()],
        "mean_words": [parent.general_chat.mean_words(), cand.general_chat.mean_words()],
        "token_f1_vs_v0": sum(f1) / len(f1),
        "ifeval_strict": [report["parent"].get("ifeval_strict"), report["candidate"].get("ifeval_strict")],
        "harmful_refusal": [report["parent"].get("harmful_refusal_rate"), report["candidate"].get("harmful_refusal_rate")],
        "training": {k: training.get(k) for k in ("steps", "final_loss", "examples", "replayed_examples",
                                                  "learning_rate", "epochs", "auto", "mean_step_s")}
        if training else None,
        "everyday": everyday_answers(model_dir),
        "report": report,
    }


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="old-defaults,osft-noreplay,osft")
    parser.add_argument("--name", default="bench_general_chat")
    args = parser.parse_args()

    base = base_model_dir()
    results = {"everyday_v0": everyday_answers(base), "rows": []}
    with pipeline_context(base) as ctx:
        for name in args.variants.split(","):
            print(f"== {name}", flush=True)
            results["rows"].append(run_variant(ctx, name, VARIANTS[name]))
            write_result(args.name, results)


if __name__ == "__main__":
    main()
