"""The gate step of a job: score the candidate, compare it with its parent, keep the scores.

Every version's scores are stored once (Redis key `sculptor:scores:{version}`), so a job scores
only its candidate, plus the parent on the new task's eval set (the parent has never seen it).
The accuracy matrix R[version][task] is the task part of those scores; promotion adds the
lineage's AA and BWT to the report.
"""

from __future__ import annotations

from pathlib import Path

from sculptor.context import Context
from sculptor.datasets import Example
from sculptor.records import TaskRecord
from worker import gates
from worker.gates.evaluate import TaskEval
from worker.gates.scores import normalized
from worker.training.device import resolve_train_device

SCORES_KEY = "sculptor:scores:{}"


def load_scores(ctx: Context, version: str) -> gates.VersionScores | None:
    raw = ctx.redis.get(SCORES_KEY.format(version))
    return gates.VersionScores.model_validate_json(raw) if raw else None


def save_scores(ctx: Context, version: str, scores: gates.VersionScores) -> None:
    ctx.redis.set(SCORES_KEY.format(version), scores.model_dump_json())


def lineage(ctx: Context, version: str | None) -> list[str]:
    """Versions from v0 to `version`, following parents."""
    chain = []
    while version:
        chain.append(version)
        record = ctx.versions.get(version)
        version = record.parent if record else None
    return chain[::-1]


def lineage_tasks(ctx: Context, version: str) -> list[tuple[str, str]]:
    """(version, task_id) for every version in the lineage that learned a task, oldest first."""
    out = []
    for v in lineage(ctx, version):
        record = ctx.versions.get(v)
        if record and record.task_id:
            out.append((v, record.task_id))
    return out


def eval_examples(ctx: Context, task: TaskRecord) -> list[Example]:
    from worker.pipeline import load_examples

    return load_examples(ctx, task.eval_uri) if task.eval_uri else []


def task_answers(ctx: Context, task: TaskRecord) -> set[str]:
    """The task's own answers (every assistant turn of its training examples), normalized."""
    from worker.pipeline import load_examples

    return {normalized(m.content) for e in load_examples(ctx, task.dataset_uri) for m in e.messages
            if m.role == "assistant"}


def suites(ctx: Context) -> gates.Suites:
    s = ctx.settings
    sizes = gates.SuiteSizes(harmful=s.gate_harmful_items, benign=s.gate_benign_items, ifeval=s.gate_ifeval_items,
                             general_text=s.gate_general_text_items, general_chat=s.gate_general_chat_items)
    paths = {name: Path(p) if p else None for name, p in (
        ("harmful", s.gate_harmful_suite), ("benign", s.gate_benign_suite),
        ("ifeval", s.gate_ifeval_suite), ("general_text", s.gate_general_text_suite),
        ("general_chat", s.gate_general_chat_suite))}
    return gates.load_suites(sizes=sizes, **paths)


def evaluate_candidate(ctx: Context, task: TaskRecord, parent: str, candidate: str,
                       candidate_dir: Path, parent_dir: Path) -> dict:
    """Score `candidate`, gate it against `parent`, and return the JSON-able gate report."""
    task_evals, overrides = {}, {}
    for _, task_id in lineage_tasks(ctx, parent) + [(candidate, task.task_id)]:
        record = ctx.tasks.get(task_id)
        examples = eval_examples(ctx, record)
        if examples:
            task_evals[task_id] = (record.metric, examples)
        if record.hyperparameters.gate_thresholds:
            overrides[task_id] = record.hyperparameters.gate_thresholds
    thresholds = gates.GateThresholds(**ctx.settings.gate_thresholds)
    parent_scores, candidate_scores, report = score_and_decide(
        task_evals, suites(ctx), task.task_id, parent_dir, candidate_dir, load_scores(ctx, parent),
        thresholds, overrides, task_answers(ctx, task), device=resolve_train_device(ctx.settings.train_device))
    save_scores(ctx, parent, parent_scores)
    save_scores(ctx, candidate, candidate_scores)
    return report.model_dump(mode="json") | {"seconds": candidate_scores.seconds, "work": candidate_scores.work}


def score_and_decide(task_evals: dict[str, TaskEval], the_suites: gates.Suites, new_task_id: str,
                     parent_dir: Path, candidate_dir: Path, parent_stored: gates.VersionScores | None,
                     thresholds: gates.GateThresholds, overrides: dict | None = None,
                     new_task_answers: set[str] | frozenset[str] = frozenset(), device=None,
                     ) -> tuple[gates.VersionScores, gates.VersionScores, gates.GateReport]:
    """The gate without Redis: complete the parent's stored scores (usually just the new task),
    score the candidate on everything, decide. bench/bench_gates.py times exactly this.
    `device`: where the two models run (the job's; None: the CPU)."""
    parent_scores = gates.evaluate(gates.HFGenerator.from_pretrained(parent_dir, device=device), task_evals,
                                   the_suites, reuse=parent_stored)
    candidate_scores = gates.evaluate(gates.HFGenerator.from_pretrained(candidate_dir, device=device), task_evals,
                                      the_suites, chat_reference=parent_scores.general_chat)
    # The lineage's tasks only: the parent's stored scores may also hold a rejected sibling job's new task.
    earlier = [t for t in task_evals if t != new_task_id]
    report = gates.decide(candidate_scores, parent_scores, new_task_id, thresholds, overrides, earlier,
                          new_task_answers)
    return parent_scores, candidate_scores, report


def accuracy_matrix(ctx: Context, version: str) -> dict:
    """R[version][task] over the lineage of `version`, with AA and BWT."""
    learned = lineage_tasks(ctx, version)
    rows = {}
    for v in lineage(ctx, version):
        scores = load_scores(ctx, v)
        if scores:
            rows[v] = {t: s.mean for t, s in scores.tasks.items()}
    versions = [v for v, _ in learned]
    tasks = [t for _, t in learned]
    complete = bool(learned) and all(v in rows for v in versions) and all(
        t in rows[versions[-1]] and t in rows[v] for v, t in learned)
    return {
        "R": rows, "versions": versions, "tasks": tasks,
        "AA": gates.average_accuracy(rows, versions, tasks) if complete else None,
        "BWT": gates.backward_transfer(rows, versions, tasks) if complete else None,
    }
