"""Regression gates: score a candidate model version and decide whether it may be promoted.

The flow a training job follows (see decide.py for the gates and how the CIs are used):

    train, evals = split_eval(examples, eval_examples)              # sculptor/splits.py: at upload, stored with the task
    suites = load_suites(sizes=GATE_SIZES)                          # shipped or user suites
    parent = evaluate(HFGenerator(parent_model, tok), {new_id: (metric, evals)}, None, reuse=stored_parent)
    candidate = evaluate(HFGenerator(candidate_model, tok), all_tasks, suites)
    report = decide(candidate, parent_full, new_id, GateThresholds(), per_task_overrides)

Modules: metrics (task metrics), refusal (refusal judge), ifeval (lm-eval's checkers, offline), suites
(the shipped JSONL suites), generation (Generator protocol, HF engine), evaluate, bootstrap (paired CIs),
decide (the gates). The pure models they fill live in sculptor/, which the gateway reads too:
sculptor/scores.py (per-item scores of a version), sculptor/gate_report.py (thresholds, the report),
sculptor/splits.py (the eval split), sculptor/accuracy.py (AA / BWT over the accuracy matrix).
"""

from sculptor.gate_report import GateReport, GateResult, GateThresholds
from sculptor.scores import ChatAnswers, ItemScores, PerplexityScores, TaskScores, VersionScores
from worker.gates.decide import decide
from worker.gates.evaluate import EvalConfig, evaluate, example_ids
from worker.gates.generation import GenerationStats, Generator, HFGenerator, TextLosses
from worker.gates.metrics import normalise, score
from worker.gates.refusal import PatternRefusalJudge, RefusalJudge
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
    "decide",
    "evaluate",
    "example_ids",
    "load_suites",
    "normalise",
    "score",
]
