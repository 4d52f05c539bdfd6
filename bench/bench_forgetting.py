"""A stream of four tasks through the real job pipeline: is each learned, is each kept, is the model still itself?

SmolLM2-135M (v0) learns four tasks one after another through `worker/pipeline.py: run_job` (train,
save, gate, promote; real Redis and object store, no Celery), with the hyperparameters a user gets
at the service's defaults unless a row says otherwise:
  1. departments: 240 customer messages whose answers are single department names (one short format:
     the task that made the served model answer "billing" to everything, issue 14); the service
     carves its eval split;
  2.-4. three invented-fact tasks of bench_forgetting_methods.py (16 keys each, answers the base cannot
     know: "What is the Zorblish word for river?" -> "vantu"), evaluated on their own examples.
A candidate the gates reject is force-promoted, as an admin could, so every row sees the whole stream
(the report says which were rejected and why).

Per row: the accuracy matrix R (the gates' own task scores), AA, BWT and the diagonal; after the last
task, against v0: the general-chat gate's measure (NLL rise of v0's answers, paired CI), token-F1 of
the answers against v0's, the collapse rate (share of everyday prompts answered in a task's format, as
the gate's leak check judges it, or in at most 3 words where v0 used at least 8), the share of v0's
stated facts no longer stated (the gate's facts check), IFEval strict,
harmful refusal and perplexity; per job the learning rate, steps and rounds it chose, the replayed
examples, the gate verdict and wall time.

Each row runs in its own process, one after another (the machine has two cores):

    .venv/bin/python bench/bench_forgetting.py --rows shipped,full,osft-noreplay,osft-chat-memory
    .venv/bin/python bench/bench_forgetting.py --table      # bench/results/bench_forgetting*.json -> markdown
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forgetting_methods import make_tasks  # noqa: E402
from bench_general_chat import EVERYDAY, department_task, token_f1  # noqa: E402
from common import RESULTS, base_model_dir, pipeline_context, write_result  # noqa: E402

ROWS = {  # name: hyperparameters on top of the service's defaults (auto learning rate and epochs, replay 0.5)
    "shipped": {},
    "osft-noreplay": {"general_replay": 0.0},
    "osft-replay-kl": {"general_replay_kl": True},  # the replayed answers as the parent's distribution: shipped
    "osft-replay-sampled": {"general_replay_kl": False},  # the sampled tokens only (the seventh session's shipped)
    "osft-chat-memory": {"general_replay": 0.0, "general_chat_memory": True},
    "osft-replay-chat-memory": {"general_chat_memory": True},
    "full": {"method": "full", "general_replay": 0.0},  # plain fine-tuning, its own rate chosen by the probe
    "full-replay": {"method": "full"},
    "old-defaults": {"general_replay": 0.0, "learning_rate": 3e-4, "epochs": 2},
    # Rehearsal of earlier tasks' examples, on and off at equal steps (fixed rate, epochs and max_steps).
    "rehearsal-off": {"learning_rate": 1e-3, "epochs": 4, "max_steps": 64},
    "rehearsal-on": {"learning_rate": 1e-3, "epochs": 4, "max_steps": 64, "task_replay": 0.5},
}
GOALS = {"BWT": -2.0, "of_plain": 0.9, "ifeval_points": 3.0}


def stream(seed: int) -> list[dict]:
    """The four tasks, as uploads: name, examples, eval examples (None: the service carves them)."""
    invented = make_tasks(4, 16, seed)[1:]  # formats 2-4 of bench_forgetting_methods (vaults, planets, glyphs)
    tasks = [{"name": "departments", "examples": department_task(seed), "eval": None}]
    for i, task in enumerate(invented):
        examples = [{"messages": m} for m in task]
        tasks.append({"name": f"invented-{i + 2}", "examples": examples, "eval": examples})
    return tasks


def submit(ctx, upload: dict, hp: dict):
    from sculptor.datasets import Example, parse_hyperparameters
    from service.api.routes.tasks import TaskSubmission, store_and_enqueue

    sub = TaskSubmission(
        name=upload["name"], examples=[Example.model_validate(e) for e in upload["examples"]],
        eval_examples=[Example.model_validate(e) for e in upload["eval"]] if upload["eval"] else None,
        metric="exact_match", hyperparameters=parse_hyperparameters(hp), webhook_url=None, size_bytes=1)
    _, job = store_and_enqueue(ctx, sub)
    ctx.redis.delete(ctx.settings.train_queue)  # run in this process; no Celery worker takes it
    return job


def job_row(job, wall: float, task_name: str) -> dict:
    t = job.training.model_dump(mode="json") if job.training else {}
    gates = job.gates.model_dump(mode="json") if job.gates else {}
    auto = t.get("auto") or {}
    return {"task": task_name, "version": job.candidate_version, "status": job.status,
            "forced": bool(gates.get("forced")), "failed_gates": gates.get("failed"),
            "summary": gates.get("summary"), "learning_rate": t.get("learning_rate"),
            "epochs": t.get("epochs"), "steps": t.get("steps"), "rounds": t.get("rounds"),
            "reproduced": t.get("reproduced_share"), "replayed_examples": t.get("replayed_examples"), "replay_kl": t.get("replay_kl"),
            "probe": auto.get("probe_validation_loss"), "final_loss": t.get("final_loss"),
            "mean_step_s": t.get("mean_step_s"), "gate_s": sum(gates.get("seconds", {}).values()),
            "answers_nll_rise": {f"{g['gate']}:{g['subject']}": g["delta"] for g in gates.get("gates", [])
                                 if g["subject"].endswith("_answers_nll")},
            "per_prompt": {g["subject"]: g["value"] for g in gates.get("gates", [])
                           if g["subject"] in ("facts_lost", "task_answer_leak", "shortened_answers")},
            "wall_s": round(wall, 1)}


def against_base(ctx, final: str, task_answers: set[str]) -> dict:
    """The last version against v0 on everyday prompts, IFEval, refusal and perplexity."""
    from sculptor import checkpoints
    from sculptor.accuracy import load_scores
    from worker import gate_step, gates
    from worker.gates.decide import facts_lost, general_chat_gates, suite_answers_drift

    base, last = load_scores(ctx, "v0"), load_scores(ctx, final)
    model_dir = checkpoints.fetch(ctx.store, final, ctx.settings.checkpoint_cache_dir)
    generator = gates.HFGenerator.from_pretrained(model_dir)
    last = gates.evaluate(generator, {}, gate_step.suites(ctx), reuse=last, parent=base)
    t = gates.GateThresholds(**ctx.settings.gate_thresholds)
    nll, collapse, _ = general_chat_gates(last, base, t)
    harmful = suite_answers_drift("safety", last.harmful_vs_parent, base.harmful_answers,
                                  t.harmful_answers_max_nll_rise, t)
    ifeval = suite_answers_drift("instruction_following", last.ifeval_vs_parent, base.ifeval_answers,
                                 t.ifeval_answers_max_nll_rise, t)
    pairs = list(zip(last.general_chat.answers, base.general_chat.answers))
    leaked = last.general_chat.leaks(task_answers, parent=base.general_chat)  # the gate's check, against v0
    shortened = last.general_chat.shortened(base.general_chat)  # the gate's other per-prompt check
    collapsed = [c for (c, _), leak, short in zip(pairs, leaked, shortened) if leak or short]
    facts = facts_lost(last.facts, base.facts, t, against="root")  # the gate's root facts check, against v0
    everyday = generator.generate([[{"role": "user", "content": p}] for p in EVERYDAY], 32)
    return {
        "chat_nll_rise": nll.delta, "chat_nll_ci": [nll.ci_low, nll.ci_high], "chat_nll_threshold": nll.threshold,
        "chat_nll_passed": nll.passed, "collapse_gate_passed": collapse.passed, "collapse_reason": collapse.reason,
        "collapse_rate": len(collapsed) / len(pairs), "collapsed_examples": collapsed[:5],
        "leaked": int(leaked.sum()), "shortened": int(shortened.sum()),
        "facts_lost": [facts[0].value, facts[0].n_items] if facts else None,
        "facts_stated": [base.summary()["facts_stated"], last.summary()["facts_stated"]],
        "token_f1_vs_v0": sum(token_f1(c, b) for c, b in pairs) / len(pairs),
        "ifeval_strict": [base.ifeval_strict.mean, last.ifeval_strict.mean],
        "ifeval_answers_nll_rise": [ifeval.delta, ifeval.ci_low, ifeval.ci_high],
        "harmful_answers_nll_rise": [harmful.delta, harmful.ci_low, harmful.ci_high],
        "harmful_refusal": [base.harmful_refusal.mean, last.harmful_refusal.mean],
        "perplexity_ratio": last.perplexity.perplexity / base.perplexity.perplexity,
        "everyday": dict(zip(EVERYDAY, everyday)),
    }


def run_row(name: str, seed: int, model_dir: Path) -> dict:
    from sculptor import lineage
    from sculptor.accuracy import accuracy_matrix
    from sculptor.scores import normalized
    from worker.pipeline import run_job

    uploads = stream(seed)
    task_answers = {normalized(m["messages"][-1]["content"]) if "messages" in m else m["completion"]
                    for u in uploads for m in u["examples"]}
    load_before, started = os.getloadavg(), time.monotonic()
    with pipeline_context(model_dir) as ctx:
        jobs = []
        for upload in uploads:
            job_started = time.monotonic()
            job = run_job(ctx, submit(ctx, upload, ROWS[name]).job_id)
            if job.status == "rejected":
                job = lineage.force_promote(ctx.versions, ctx.jobs, ctx.store, job)  # as POST /jobs/{id}/promote does
            if job.status != "promoted":
                raise SystemExit(f"{name}: {upload['name']} ended {job.status}: {job.error}")
            jobs.append(job_row(job, time.monotonic() - job_started, upload["name"]))
            print(f"[bench-forgetting] {name}: {jobs[-1]}", file=sys.stderr, flush=True)
        final = jobs[-1]["version"]
        matrix = accuracy_matrix(ctx, final)
        R = [[round(100 * matrix["R"][v].get(t, 0.0), 1) for t in matrix["tasks"]] for v in matrix["versions"]]
        result = {"row": name, "hyperparameters": ROWS[name], "tasks": [u["name"] for u in uploads],
                  "R": R, **summaries(R), "jobs": jobs, "vs_base": against_base(ctx, final, task_answers)}
    return result | {"wall_s": round(time.monotonic() - started), "load_average": [load_before, os.getloadavg()]}


def summaries(R: list[list[float]]) -> dict:
    T = len(R)
    return {"AA": round(sum(R[-1]) / T, 2), "BWT": round(sum(R[-1][i] - R[i][i] for i in range(T - 1)) / max(1, T - 1), 2),
            "diagonal": [R[i][i] for i in range(T)]}


def table() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("bench_forgetting_*.json"))
            if not p.name.startswith("bench_forgetting_methods")]
    plain = next((r for r in rows if r["row"] == "full"), None)
    head = ("| row | R (last row) | diagonal | AA | BWT | ≥90 % of plain per task | chat NLL rise vs v0 [95 % CI] "
            "| token-F1 vs v0 | collapse rate (leaked + shortened) | facts lost vs v0 | IFEval strict | harmful refusal | ppl | rejected jobs | lr chosen | load | wall |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = r["vs_base"]
        of_plain = ("–" if not plain or r is plain else
                    "yes" if all(d >= GOALS["of_plain"] * p for d, p in zip(r["diagonal"], plain["diagonal"])) else "**no**")
        rates = ", ".join(f"{j['learning_rate']:g}" for j in r["jobs"])
        rejected = ", ".join(f"{j['task']} ({', '.join(g.split(':')[0] for g in j['failed_gates'] or [])})"
                             for j in r["jobs"] if j["forced"]) or "–"
        lines.append(
            f"| {r['row']} | {r['R'][-1]} | {r['diagonal']} | {r['AA']:.1f} | {r['BWT']:+.1f} | {of_plain} "
            f"| {b['chat_nll_rise']:+.3f} [{b['chat_nll_ci'][0]:+.3f}, {b['chat_nll_ci'][1]:+.3f}] "
            f"| {b['token_f1_vs_v0']:.2f} | {b['collapse_rate']:.3f} ({b.get('leaked', '?')} + {b.get('shortened', '?')}) "
            f"| {_facts_cell(b.get('facts_lost'))} "
            f"| {100 * b['ifeval_strict'][0]:.1f} → {100 * b['ifeval_strict'][1]:.1f} "
            f"| {100 * b['harmful_refusal'][0]:.1f} → {100 * b['harmful_refusal'][1]:.1f} | ×{b['perplexity_ratio']:.3f} "
            f"| {rejected} | {rates} "
            f"| {r['load_average'][0][0]:.1f}–{r['load_average'][1][0]:.1f} | {r['wall_s'] / 60:.0f} min |")
    return "\n".join(lines)


def _facts_cell(lost: list | None) -> str:
    return f"{100 * lost[0]:.1f} % of {lost[1]}" if lost else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="shipped,full,osft-noreplay,osft-chat-memory")
    parser.add_argument("--row", help="run one row in this process (what --rows starts per row)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="base model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the stored rows")
    args = parser.parse_args()
    if args.table:
        print(table())
    elif args.row:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        write_result(f"bench_forgetting_{args.row}", run_row(args.row, args.seed, args.model or base_model_dir()))
    else:
        for name in args.rows.split(","):
            if name not in ROWS:
                raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
            model = ["--model", str(args.model)] if args.model else []
            subprocess.run([sys.executable, __file__, "--row", name, "--seed", str(args.seed), *model], check=True)
        print(table())


if __name__ == "__main__":
    main()
