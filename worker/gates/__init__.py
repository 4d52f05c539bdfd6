"""Regression gates: score a candidate model version and decide whether it may be promoted.

The flow a training job follows (see decide.py for the gates and how the CIs are used):

    train, evals = split_eval(examples, eval_examples)              # once per task, stored with it
    suites = load_suites(sizes=GATE_SIZES)                          # shipped or user suites
    parent = evaluate(HFGenerator(parent_model, tok), {new_id: (metric, evals)}, None, reuse=stored_parent)
    candidate = evaluate(HFGenerator(candidate_model, tok), all_tasks, suites)
    report = decide(candidate, parent_full, new_id, GateThresholds(), per_task_overrides)

Modules: splits (eval split), metrics (task metrics), refusal (refusal judge), ifeval (lm-eval's
checkers, offline), suites (the shipped JSONL suites), generation (Generator protocol, HF engine),
scores (per-item scores of a version), evaluate, bootstrap (paired CIs), decide (the five gates),
matrix (AA / BWT over the accuracy matrix).
"""

from worker.gates.decide import GateReport, GateResult, GateThresholds, decide
from worker.gates.evaluate import EvalConfig, evaluate, example_ids
from worker.gates.generation import GenerationStats, Generator, HFGenerator, TextLosses
from worker.gates.matrix import average_accuracy, backward_transfer
from worker.gates.metrics import normalise, score
from worker.gates.refusal import PatternRefusalJudge, RefusalJudge
from worker.gates.scores import ChatAnswers, ItemScores, PerplexityScores, TaskScores, VersionScores
from worker.gates.splits import split_eval
from worker.gates.suites import GATE_SIZES, Suites, SuiteSizes, load_suites

__all__ = [
    "GATE_SIZES",
    "ChatAnswers",
    "EvalConfig",
    "GateReport",
    "GateResult",
    "GateThresholds",
    "GenerationStats",
    "Generator",
    "HFGenerator",
    "ItemScores",
    "PatternRefusalJudge",
    "PerplexityScores",
    "RefusalJudge",
    "SuiteSizes",
    "Suites",
    "TaskScores",
    "TextLosses",
    "VersionScores",
    "average_accuracy",
    "backward_transfer",
    "decide",
    "evaluate",
    "example_ids",
    "load_suites",
    "normalise",
    "score",
    "split_eval",
]
