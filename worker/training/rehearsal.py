"""Rehearsal: a small share of earlier tasks' own training examples, mixed into a job's data (off by default).

The service keeps every task's dataset, so a job can revisit what the lineage learned before, beside the
subspace constraint and the task memory. `task_replay` is the share of the new task's example count to
draw; the earlier tasks share it equally (so a large old dataset does not crowd out the others), each
sampled with the job's seed. `task_replay_from` limits it to the named tasks; by default every task the
parent's lineage learned.
"""

from __future__ import annotations

import random

from sculptor.datasets import Example, load_examples
from sculptor.records import TaskRecord
from sculptor.storage import ObjectStore


def rehearsal_examples(store: ObjectStore, earlier: list[TaskRecord], share: float, task_examples: int,
                       seed: int) -> dict[str, list[Example]]:
    """About `share` × `task_examples` examples, split equally over `earlier` (oldest first), per task id."""
    wanted = round(share * task_examples)
    if wanted <= 0 or not earlier:
        return {}
    rng = random.Random(seed)
    drawn: dict[str, list[Example]] = {}
    for i, task in enumerate(earlier):
        count = wanted // len(earlier) + (i < wanted % len(earlier))
        pool = load_examples(store, task.dataset_uri)
        drawn[task.task_id] = rng.sample(pool, min(count, len(pool)))
    return drawn


def tasks_to_rehearse(lineage_task_ids: list[str], chosen: list[str] | None) -> list[str]:
    """The lineage's tasks (oldest first), limited to `chosen` when given; a chosen task the lineage did not
    learn is left out (it is reported in the job's training summary)."""
    return [t for t in lineage_task_ids if chosen is None or t in chosen]
