"""The gate step of a job: score the candidate, compare it with its parent, keep the scores.

Every version's scores are stored once (sculptor/accuracy.py: Redis key `sculptor:scores:{version}`),
so a job scores only its candidate, plus the parent on the new task's eval set (the parent has never
seen it). The accuracy matrix R[version][task] is the task part of those scores; promotion adds the
lineage's AA and BWT to the report (sculptor/accuracy.py, which the gateway's GET /accuracy reads too).
"""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sculptor import checkpoints
from sculptor.accuracy import lineage, lineage_tasks, load_scores, save_scores
from sculptor.context import Context
from sculptor.datasets import Example, load_examples
from sculptor.gate_report import JobGates
from sculptor.records import TaskRecord
from sculptor.scores import normalized
from worker import gates
from worker.gates.evaluate import TaskEval
from worker.training.device import resolve_train_device


def eval_examples(ctx: Context, task: TaskRecord) -> list[Example]:
    return load_examples(ctx.store, task.eval_uri) if task.eval_uri else []


def task_answers(ctx: Context, task: TaskRecord) -> set[str]:
    """The task's own answers (every assistant turn of its training examples), normalized."""
    return {normalized(m.content) for e in load_examples(ctx.store, task.dataset_uri) for m in e.messages
            if m.role == "assistant"}


def suites(ctx: Context) -> gates.Suites:
    s = ctx.settings
    sizes = gates.SuiteSizes(harmful=s.gate_harmful_items, benign=s.gate_benign_items, ifeval=s.gate_ifeval_items,
                             general_text=s.gate_general_text_items, general_chat=s.gate_general_chat_items, facts=s.gate_facts_items)
    paths = {name: Path(p) if p else None for name, p in (
        ("harmful", s.gate_harmful_suite), ("benign", s.gate_benign_suite),
        ("ifeval", s.gate_ifeval_suite), ("general_text", s.gate_general_text_suite),
        ("general_chat", s.gate_general_chat_suite), ("facts", s.gate_facts_suite))}
    return gates.load_suites(sizes=sizes, **paths)


def evaluate_candidate(ctx: Context, task: TaskRecord, parent: str, candidate: str,
                       candidate_dir: Path, parent_dir: Path) -> JobGates:
    """Score `candidate`, gate it against `parent`, and return the gate report as the job records it."""
    task_evals, overrides = {}, {}
    for _, task_id in lineage_tasks(ctx, parent) + [(candidate, task.task_id)]:
        record = ctx.tasks.get(task_id)
        examples = eval_examples(ctx, record)
        if examples:
            task_evals[task_id] = (record.metric, examples)
        if record.hyperparameters.gate_thresholds:
            overrides[task_id] = record.hyperparameters.gate_thresholds
    thresholds = gates.GateThresholds(**ctx.settings.gate_thresholds)
    device = resolve_train_device(ctx.settings.train_device)
    root = lineage(ctx, parent)[0]
    root_version = None if root == parent else RootVersion(
        lambda: checkpoints.fetch(ctx.store, root, ctx.settings.checkpoint_cache_dir), load_scores(ctx, root))
    parent_scores, candidate_scores, report = score_and_decide(
        task_evals, suites(ctx), task.task_id, parent_dir, candidate_dir, load_scores(ctx, parent),
        thresholds, overrides, task_answers(ctx, task), device=device, engine=gate_engine(ctx.settings.gate_engine, device),
        root=root_version)
    save_scores(ctx, parent, parent_scores)
    save_scores(ctx, candidate, candidate_scores)
    if root_version is not None:
        save_scores(ctx, root, root_version.scores)
    return JobGates.model_validate({**report.model_dump(), "seconds": candidate_scores.seconds,
                                    "work": candidate_scores.work})


@dataclass
class RootVersion:
    """The lineage's first version, for the general-chat drift check: its checkpoint (fetched only if its
    stored scores lack the current suite's answers) and those scores."""

    model_dir: Callable[[], Path]
    scores: gates.VersionScores | None


def score_and_decide(task_evals: dict[str, TaskEval], the_suites: gates.Suites, new_task_id: str,
                     parent_dir: Path, candidate_dir: Path, parent_stored: gates.VersionScores | None,
                     thresholds: gates.GateThresholds, overrides: dict | None = None,
                     new_task_answers: set[str] | frozenset[str] = frozenset(), device=None,
                     engine: str = "transformers", root: RootVersion | None = None,
                     ) -> tuple[gates.VersionScores, gates.VersionScores, gates.GateReport]:
    """The gate without Redis: complete the parent's stored scores (usually just the new task),
    score the candidate on everything, decide. bench/bench_gates.py times exactly this.
    `device`: where the two models run (the job's; None: the CPU); `engine`: see `open_generator`;
    `root`: the lineage's first version when the parent is not it (its scores are completed in place)."""
    with open_generator(parent_dir, device, engine) as generator:
        parent_scores = gates.evaluate(generator, task_evals, the_suites, reuse=parent_stored)
    if root is not None and not _has_root_answers(root.scores, the_suites):
        with open_generator(root.model_dir(), device, engine) as generator:
            root.scores = gates.evaluate(generator, {}, the_suites, reuse=root.scores)
    with open_generator(candidate_dir, device, engine) as generator:
        candidate_scores = gates.evaluate(generator, task_evals, the_suites, parent=parent_scores,
                                          root_reference=root.scores.general_chat if root else None)
    # The lineage's tasks only: the parent's stored scores may also hold a rejected sibling job's new task.
    earlier = [t for t in task_evals if t != new_task_id]
    report = gates.decide(candidate_scores, parent_scores, new_task_id, thresholds, overrides, earlier,
                          new_task_answers, root=root.scores if root else None)
    return parent_scores, candidate_scores, report


def _has_root_answers(scores: gates.VersionScores | None, the_suites: gates.Suites) -> bool:
    """The root's stored scores hold its answers to the current general-chat and facts suites."""
    chat, facts = [item.id for item in the_suites.general_chat], [item.id for item in the_suites.facts]
    return (scores is not None and scores.general_chat is not None and scores.general_chat.ids == chat
            and (not facts or (scores.facts is not None and scores.facts.ids == facts)))


def gate_engine(setting: str, device) -> str:
    """`auto`: vLLM on a CUDA worker where it is installed (far faster batched decoding), else transformers."""
    if setting != "auto":
        return setting
    if torch.device(device or "cpu").type != "cuda":
        return "transformers"
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


@contextmanager
def open_generator(model_dir: Path, device, engine: str):
    """One version's generator for the gates; a vLLM engine is shut down (its memory freed) on exit."""
    if engine == "vllm":
        from worker.gates.vllm_generator import VLLMGenerator

        gc.collect()  # the job's training state is gone (pipeline.train_candidate): give its memory back first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        generator = VLLMGenerator.from_pretrained(model_dir)
        try:
            yield generator
        finally:
            generator.close()
    else:
        yield gates.HFGenerator.from_pretrained(model_dir, device=device)
