"""Score one model version: every task's eval set plus the fixed suites, item by item.

Generation budgets are capped per part because decoding dominates the gate's cost on CPU. The
parent and the candidate share every cap, so deltas stay fair; a cap only makes some items harder
for both. Measured on SmolLM2-135M-Instruct (v0) with the shipped suites at GATE_SIZES:
  - refusal, 32 tokens (~140 characters, most of the judge's 160-character window): refusals
    announce themselves in the opening words; the judge's verdict on all 56 responses was the same
    for every prefix from 8 to 64 tokens.
  - IFEval, 96 tokens (was 128): the shipped prompts ask for short answers; v0's answers have a
    median of ~27 tokens, 9 of 32 reach 96 (6 reach 128). v0's strict accuracy is 8/32 at caps
    48-80, 9/32 at 96-160 (the same items), 10/32 at 192-256. What a cap makes harder is writing out
    long structures: detectable_format:multiple_sections (lost below 192),
    number_highlighted_sections (lost below 96), and in long answers length_constraints:* (number of
    words/paragraphs), detectable_content:postscript and startend:end_checker, which need the
    answer's end. A candidate whose answers grow longer than its parent's loses on those items.
  - a task answer needs little more than its longest reference (estimated from its characters;
    `contains` may find the reference later in a longer answer, so it gets the cap).
Rows stop at their end-of-turn token (see HFGenerator.greedy), so a cap costs only for the answers
that reach it. Pass `reuse` (the version's stored scores) to evaluate only what is missing from them.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence

from pydantic import BaseModel

from sculptor.datasets import Example, Metric
from sculptor.scores import (ChatAnswers, FactAnswers, ItemScores, PerplexityScores, TaskScores, VersionScores,
                             states_fact)
from worker.gates.generation import Generator
from worker.gates.ifeval import score_response
from worker.gates.metrics import score
from worker.gates.refusal import PatternRefusalJudge, RefusalJudge
from worker.gates.suites import Suites

TaskEval = tuple[Metric, Sequence[Example]]


class EvalConfig(BaseModel):
    task_max_new_tokens: int = 64
    refusal_max_new_tokens: int = 32
    ifeval_max_new_tokens: int = 96
    # General chat: enough for an answer's opening sentences, which is where a collapsed model shows.
    chat_max_new_tokens: int = 48
    facts_max_new_tokens: int = 48  # a sentence: "The capital of Peru is Lima, ..."
    failures_kept: int = 3  # responses kept per part for reading (the ones that scored badly)


def example_ids(examples: Sequence[Example]) -> list[str]:
    """Content ids, so stored scores pair with the same examples even if their order changes."""
    seen: dict[str, int] = {}
    ids = []
    for e in examples:
        digest = hashlib.sha1(json.dumps(e.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
        seen[digest] = seen.get(digest, 0) + 1
        ids.append(digest if seen[digest] == 1 else f"{digest}-{seen[digest]}")
    return ids


def answer_budget(metric: Metric, examples: Sequence[Example], cap: int) -> int:
    if metric == "contains":
        return cap
    longest = max(len(e.answer) for e in examples)
    return max(8, min(cap, math.ceil(longest / 2) + 8))  # >= 2 characters per token, plus slack


def _failures(prompts: Sequence[str], responses: Sequence[str], bad: Sequence[bool], keep: int) -> list[dict]:
    return [{"prompt": p, "response": r} for p, r, b in zip(prompts, responses, bad) if b][:keep]


def _evaluate_task(generator: Generator, metric: Metric, examples: Sequence[Example], config: EvalConfig,
                   scores: VersionScores, task_id: str) -> None:
    budget = answer_budget(metric, examples, config.task_max_new_tokens)
    responses = generator.generate([e.prompt_messages for e in examples], budget)
    values = [score(metric, r, e.answer) for r, e in zip(responses, examples)]
    scores.tasks[task_id] = TaskScores(ids=example_ids(examples), values=values, metric=metric)
    scores.samples[f"task:{task_id}"] = _failures(
        [e.last_user_turn for e in examples], responses, [v < 1 for v in values],
        config.failures_kept)


def _evaluate_refusals(generator: Generator, suites: Suites, judge: RefusalJudge, config: EvalConfig,
                       scores: VersionScores) -> None:
    """Harmful and benign prompts in one generate call (same budget, fuller batches)."""
    items = suites.harmful + suites.benign
    prompts = [item.prompt for item in items]
    responses = generator.generate([[{"role": "user", "content": p}] for p in prompts],
                                   config.refusal_max_new_tokens)
    refused = [float(r) for r in judge.is_refusal(prompts, responses)]
    n = len(suites.harmful)
    scores.harmful_refusal = ItemScores(ids=[i.id for i in suites.harmful], values=refused[:n])
    scores.harmful_answers = _own_answers(generator, suites.harmful, responses[:n])
    scores.benign_refusal = ItemScores(ids=[i.id for i in suites.benign], values=refused[n:])
    scores.samples["harmful_complied"] = _failures(prompts[:n], responses[:n], [not r for r in refused[:n]],
                                                   config.failures_kept)
    scores.samples["benign_refused"] = _failures(prompts[n:], responses[n:], [bool(r) for r in refused[n:]],
                                                 config.failures_kept)


def _evaluate_ifeval(generator: Generator, suites: Suites, config: EvalConfig, scores: VersionScores) -> None:
    responses = generator.generate([[{"role": "user", "content": item.prompt}] for item in suites.ifeval],
                                   config.ifeval_max_new_tokens)
    outcomes = [score_response(item, r) for item, r in zip(suites.ifeval, responses)]
    ids = [str(item.key) for item in suites.ifeval]
    scores.ifeval_strict = ItemScores(ids=ids, values=[float(o.strict) for o in outcomes])
    scores.ifeval_loose = ItemScores(ids=ids, values=[float(o.loose) for o in outcomes])
    scores.ifeval_answers = _own_answers(generator, suites.ifeval, responses, ids)
    scores.samples["ifeval_failed"] = _failures([i.prompt for i in suites.ifeval], responses,
                                                [not o.strict for o in outcomes], config.failures_kept)


def _evaluate_perplexity(generator: Generator, suites: Suites, scores: VersionScores) -> None:
    losses = generator.perplexity([item.text for item in suites.general_text])
    scores.perplexity = PerplexityScores(ids=[i.id for i in suites.general_text], nll=losses.nll,
                                         tokens=losses.tokens)


def _chat(item) -> list[dict]:
    return [{"role": "user", "content": item.prompt}]


def _own_answers(generator: Generator, items: Sequence, answers: Sequence[str],
                 ids: Sequence[str] | None = None) -> ChatAnswers:
    """A suite's answers from this version, with their NLL under it (one teacher-forced pass, no decoding)."""
    losses = generator.answer_losses([_chat(item) for item in items], answers)
    return ChatAnswers(ids=list(ids) if ids is not None else [i.id for i in items], answers=list(answers),
                       nll=losses.nll, tokens=losses.tokens)


def _evaluate_general_chat(generator: Generator, suites: Suites, config: EvalConfig, scores: VersionScores) -> None:
    """This version's own greedy answers to everyday prompts, and how likely it finds them."""
    answers = generator.generate([_chat(item) for item in suites.general_chat], config.chat_max_new_tokens)
    scores.general_chat = _own_answers(generator, suites.general_chat, answers)


def _evaluate_facts(generator: Generator, suites: Suites, config: EvalConfig, scores: VersionScores) -> None:
    """This version's greedy answers to the short factual questions, and which of them state the fact."""
    answers = generator.generate([_chat(item) for item in suites.facts], config.facts_max_new_tokens)
    scores.facts = FactAnswers(ids=[i.id for i in suites.facts], answers=answers,
                               stated=[states_fact(a, i.answers) for a, i in zip(answers, suites.facts)])


def _reference_answers_nll(generator: Generator, items: Mapping[str, object], reference: ChatAnswers) -> ItemScores:
    """NLL per token of another version's answers (the parent's, the root's) to the prompts `items` (by id)
    under this version: how far it moved from that version's behaviour there (this side of a
    KL(reference || this) estimate on the reference's samples)."""
    pairs = [(i, a) for i, a in zip(reference.ids, reference.answers) if i in items]
    losses = generator.answer_losses([_chat(items[i]) for i, _ in pairs], [a for _, a in pairs])
    return ItemScores(ids=[i for i, _ in pairs], values=[n / max(1, t) for n, t in zip(losses.nll, losses.tokens)])


def _evaluate_vs_reference(generator: Generator, items: Mapping[str, object], reference: ChatAnswers,
                           scores: VersionScores, field: str) -> None:
    setattr(scores, field, _reference_answers_nll(generator, items, reference))


def _stats(generator: Generator) -> dict[str, int] | None:
    """The generator's running work totals (GenerationStats), if it keeps them."""
    stats = getattr(generator, "stats", None)
    return dict(vars(stats)) if stats is not None else None


def _same_ids(stored, ids: list[str]) -> bool:
    return stored is not None and stored.ids == ids


def evaluate(
    generator: Generator,
    tasks: Mapping[str, TaskEval],
    suites: Suites | None,
    judge: RefusalJudge | None = None,
    config: EvalConfig | None = None,
    reuse: VersionScores | None = None,
    chat_reference: ChatAnswers | None = None,
    root_reference: ChatAnswers | None = None,
    parent: VersionScores | None = None,
) -> VersionScores:
    """Scores of the model behind `generator` on `tasks` ({task_id: (metric, eval_examples)}) and `suites`.

    Parts already in `reuse` with the same item ids are copied, not re-evaluated. `suites=None`
    evaluates tasks only (e.g. the parent on a new task's eval set before training).
    `chat_reference`: the parent's general-chat answers, scored under this version (candidates only);
    `root_reference`: the lineage root's, likewise; `parent`: the parent's scores, whose answers to the
    harmful and IFEval prompts are scored likewise (and whose general-chat answers are the default
    `chat_reference`).
    """
    config = config or EvalConfig()
    judge = judge or PatternRefusalJudge()
    scores = reuse.model_copy(deep=True) if reuse else VersionScores()

    def timed(part: str, fn, *args) -> None:
        started, before = time.monotonic(), _stats(generator)
        fn(*args)
        scores.seconds[part] = round(time.monotonic() - started, 2)
        if before is not None:
            scores.work[part] = {k: v - before[k] for k, v in _stats(generator).items()}

    for task_id, (metric, examples) in tasks.items():
        stored = scores.tasks.get(task_id)
        if examples and not (_same_ids(stored, example_ids(examples)) and stored.metric == metric):
            timed(f"task:{task_id}", _evaluate_task, generator, metric, examples, config, scores, task_id)
    if suites is None:
        return scores
    harmful_ids, ifeval_ids = [i.id for i in suites.harmful], [str(i.key) for i in suites.ifeval]
    if not (_same_ids(scores.harmful_refusal, harmful_ids) and _same_ids(scores.harmful_answers, harmful_ids)
            and _same_ids(scores.benign_refusal, [i.id for i in suites.benign])):
        timed("refusal", _evaluate_refusals, generator, suites, judge, config, scores)
    if not (_same_ids(scores.ifeval_strict, ifeval_ids) and _same_ids(scores.ifeval_answers, ifeval_ids)):
        timed("ifeval", _evaluate_ifeval, generator, suites, config, scores)
    if not _same_ids(scores.perplexity, [i.id for i in suites.general_text]):
        timed("perplexity", _evaluate_perplexity, generator, suites, scores)
    if suites.general_chat and not _same_ids(scores.general_chat, [i.id for i in suites.general_chat]):
        timed("general_chat", _evaluate_general_chat, generator, suites, config, scores)
    if suites.facts and not _same_ids(scores.facts, [i.id for i in suites.facts]):
        timed("facts", _evaluate_facts, generator, suites, config, scores)
    if chat_reference is None and parent is not None:
        chat_reference = parent.general_chat
    everyday = {i.id: i for i in suites.general_chat}
    references = [("chat_vs_parent", everyday, chat_reference), ("chat_vs_root", everyday, root_reference)]
    if parent is not None:
        references += [("harmful_vs_parent", {i.id: i for i in suites.harmful}, parent.harmful_answers),
                       ("ifeval_vs_parent", dict(zip(ifeval_ids, suites.ifeval)), parent.ifeval_answers)]
    for field, items, reference in references:
        if items and reference is not None:
            timed(field, _evaluate_vs_reference, generator, items, reference, scores, field)
    return scores
