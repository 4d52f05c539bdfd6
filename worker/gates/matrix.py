"""Continual-learning summaries of the accuracy matrix R[version][task].

`versions[i]` is the version that learned `tasks[i]`; the last version is the current one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import mean

AccuracyMatrix = Mapping[str, Mapping[str, float]]


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
