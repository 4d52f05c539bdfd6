"""Each version's stored scores, the lineage, and the accuracy matrix R[version][task] with AA and BWT.

Every version's scores are stored once (Redis key `sculptor:scores:{version}`) by the job that gated it
(worker/gate_step.py); the gateway's GET /accuracy and a promoted job's report read them here. The
matrix is the task part of those scores over the lineage; `versions[i]` is the version that learned
`tasks[i]`, and the last version is the current one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import mean

from sculptor.context import Context
from sculptor.scores import VersionScores

SCORES_KEY = "sculptor:scores:{}"

AccuracyMatrix = Mapping[str, Mapping[str, float]]


def load_scores(ctx: Context, version: str) -> VersionScores | None:
    raw = ctx.redis.get(SCORES_KEY.format(version))
    return VersionScores.model_validate_json(raw) if raw else None


def save_scores(ctx: Context, version: str, scores: VersionScores) -> None:
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


def average_accuracy(R: AccuracyMatrix, versions: Sequence[str], tasks: Sequence[str]) -> float:
    """AA: the mean of the last version's row over all tasks learned so far."""
    last = R[versions[-1]]
    return mean(last[t] for t in tasks)


def backward_transfer(R: AccuracyMatrix, versions: Sequence[str], tasks: Sequence[str]) -> float | None:
    """BWT = mean over i < T of R[T][i] - R[i][i]; negative means forgetting. None with one task."""
    if len(versions) != len(tasks):
        raise ValueError("versions[i] must be the version that learned tasks[i]")
    last = R[versions[-1]]
    deltas = [last[t] - R[v][t] for v, t in zip(versions[:-1], tasks[:-1])]
    return mean(deltas) if deltas else None


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
        "AA": average_accuracy(rows, versions, tasks) if complete else None,
        "BWT": backward_transfer(rows, versions, tasks) if complete else None,
    }
