"""The evaluation split of a task: uploaded eval examples, or a seeded held-out fraction.

The split must be stable across jobs (every later job re-scores this task on the same items),
so it is a pure function of the examples and the seed. The gateway splits an upload once and stores both
parts with the task (service/api/routes/tasks.py); every job reads them from there.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def eval_size(n: int, fraction: float = 0.1, min_eval: int = 20, max_eval: int = 200) -> int:
    """`fraction` of n, raised to `min_eval` and capped at `max_eval`, never more than half of n."""
    wanted = max(round(n * fraction), min_eval)
    return max(0, min(wanted, max_eval, n // 2))


def split_eval(
    examples: Sequence[T],
    eval_examples: Sequence[T] | None = None,
    fraction: float = 0.1,
    min_eval: int = 20,
    max_eval: int = 200,
    seed: int = 0,
) -> tuple[list[T], list[T]]:
    """(train, eval). Uploaded `eval_examples` win and all `examples` train; otherwise a held-out part.

    A dataset of one example gets no eval items (its new-task gate is then skipped, and says so).
    """
    if eval_examples:
        return list(examples), list(eval_examples)
    k = eval_size(len(examples), fraction, min_eval, max_eval)
    held_out = set(random.Random(seed).sample(range(len(examples)), k))
    train = [e for i, e in enumerate(examples) if i not in held_out]
    evals = [e for i, e in enumerate(examples) if i in held_out]
    return train, evals
