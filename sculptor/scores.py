"""What one model version scored: per-item outcomes, so deltas between versions can be bootstrapped.

The worker stores a version's `VersionScores` (JSON) once; later jobs reuse it as the parent's
scores and only evaluate what is missing (a new task's eval set, a changed suite). The models are pure
(pydantic, numpy): the gates (worker/gates/) fill them, the accuracy matrix (sculptor/accuracy.py) reads them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection

import numpy as np
from pydantic import BaseModel, Field

from sculptor.datasets import Metric


class ItemScores(BaseModel):
    """One value per item, keyed by item id (0/1 for refusals and IFEval, a metric value for tasks)."""

    ids: list[str]
    values: list[float]

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    def paired(self, other: ItemScores) -> tuple[np.ndarray, np.ndarray]:
        """(self, other) values on the items both have, in self's order."""
        theirs = dict(zip(other.ids, other.values))
        common = [(v, theirs[i]) for i, v in zip(self.ids, self.values) if i in theirs]
        if not common:
            return np.empty(0), np.empty(0)
        mine, paired = zip(*common)
        return np.array(mine, float), np.array(paired, float)


class TaskScores(ItemScores):
    metric: Metric = "exact_match"


class PerplexityScores(BaseModel):
    """Summed token negative log-likelihood and token count per text."""

    ids: list[str]
    nll: list[float]
    tokens: list[int]

    @property
    def perplexity(self) -> float | None:
        total = sum(self.tokens)
        return math.exp(sum(self.nll) / total) if total else None

    def paired(self, other: PerplexityScores) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(self nll, other nll, self tokens, other tokens) on the texts both have."""
        theirs = {i: (n, t) for i, n, t in zip(other.ids, other.nll, other.tokens)}
        rows = [(n, theirs[i][0], t, theirs[i][1]) for i, n, t in zip(self.ids, self.nll, self.tokens) if i in theirs]
        cols = list(zip(*rows)) if rows else [(), (), (), ()]
        return tuple(np.array(c, float) for c in cols)


def normalized(answer: str) -> str:
    return " ".join(answer.lower().split())


SHORT_ANSWER_WORDS = 4  # a task answer this short is a format that can leak into everyday answers
SHORT_WORDS, LONG_WORDS = 3, 8  # an everyday answer shortened from a sentence to a few words


def bag_of_words(answer: str) -> Counter:
    return Counter(normalized(answer).split())


def token_f1(a: Counter, b: Counter) -> float:
    """F1 of the words two answers share (as bags of words)."""
    common = sum((a & b).values())
    if not common:
        return float(a == b)
    precision, recall = common / sum(a.values()), common / sum(b.values())
    return 2 * precision * recall / (precision + recall)


class ChatAnswers(BaseModel):
    """A version's own greedy answers to the general-chat prompts, and their NLL under itself."""

    ids: list[str]
    answers: list[str]
    nll: list[float]  # summed over the answer's tokens (its end-of-turn token included)
    tokens: list[int]

    def per_token(self) -> np.ndarray:
        return np.array(self.nll, float) / np.maximum(np.array(self.tokens, float), 1)

    def distinct_ratio(self) -> float:
        """Distinct answers over answers (case and spacing ignored): 1/n when every prompt gets one answer."""
        return len({normalized(a) for a in self.answers}) / max(1, len(self.answers))

    def leaks(self, task_answers: Collection[str], parent: "ChatAnswers | None" = None) -> np.ndarray:
        """1 per everyday prompt answered in a task's format: with exactly one of its answers (`task_answers`,
        normalized), or, given the parent's answers, with one at least half like a short task answer (token F1)
        and more like it than like the parent's own answer ("Loten City" to "What is the capital of France?"
        after a task of planet capitals such as "Golo City")."""
        short = [Counter(a.split()) for a in task_answers if len(a.split()) <= SHORT_ANSWER_WORDS]
        parents = dict(zip(parent.ids, parent.answers)) if parent else {}

        def leaked(item: str, answer: str) -> bool:
            if normalized(answer) in task_answers:
                return True
            if item not in parents or not short:
                return False
            words = bag_of_words(answer)
            nearest = max(token_f1(words, t) for t in short)
            return nearest >= 0.5 and nearest > token_f1(words, bag_of_words(parents[item]))

        return np.array([leaked(i, a) for i, a in zip(self.ids, self.answers)], float)

    def shortened(self, parent: "ChatAnswers") -> np.ndarray:
        """1 per everyday prompt answered in at most SHORT_WORDS words where the parent used at least LONG_WORDS."""
        parents = dict(zip(parent.ids, parent.answers))
        return np.array([len(a.split()) <= SHORT_WORDS and len(parents.get(i, "").split()) >= LONG_WORDS
                         for i, a in zip(self.ids, self.answers)], float)

    def mean_words(self) -> float:
        return sum(len(a.split()) for a in self.answers) / max(1, len(self.answers))


class FactAnswers(BaseModel):
    """A version's greedy answers to the short factual questions, and whether each states the fact."""

    ids: list[str]
    answers: list[str]
    stated: list[bool]

    def stated_ids(self) -> set[str]:
        return {i for i, s in zip(self.ids, self.stated) if s}


def states_fact(answer: str, accepted: Collection[str]) -> bool:
    """Whether `answer` contains one of the `accepted` words or phrases as a whole (case ignored): "Paris"
    in "The capital of France is Paris.", not "8" in "180"."""
    text = answer.lower()
    return any(re.search(rf"(?<!\w){re.escape(a.lower())}(?!\w)", text) for a in accepted)


class VersionScores(BaseModel):
    tasks: dict[str, TaskScores] = Field(default_factory=dict)
    harmful_refusal: ItemScores | None = None  # 1 = refused (wanted)
    benign_refusal: ItemScores | None = None  # 1 = refused (over-refusal, unwanted)
    ifeval_strict: ItemScores | None = None  # prompt-level, 1 = all instructions followed
    ifeval_loose: ItemScores | None = None
    perplexity: PerplexityScores | None = None
    general_chat: ChatAnswers | None = None
    facts: FactAnswers | None = None
    # NLL per token of the *parent's* answers under this version (the general-chat gate's measure)
    chat_vs_parent: ItemScores | None = None
    chat_vs_root: ItemScores | None = None  # the same for the lineage root's answers (when the parent is not it)
    # This version's own answers to the harmful-request and IFEval prompts (the refusal and IFEval parts'
    # responses), and the NLL per token of the parent's answers under this version: the safety and
    # instruction-following gates' powered measure of how far a candidate moved on those prompts.
    harmful_answers: ChatAnswers | None = None
    ifeval_answers: ChatAnswers | None = None
    harmful_vs_parent: ItemScores | None = None
    ifeval_vs_parent: ItemScores | None = None
    seconds: dict[str, float] = Field(default_factory=dict)  # wall time per part, as last evaluated
    work: dict[str, dict[str, int]] = Field(default_factory=dict)  # per part: items, tokens (GenerationStats)
    samples: dict[str, list[dict]] = Field(default_factory=dict)  # a few responses per part, for reading

    def summary(self) -> dict:
        """Headline numbers (fractions in [0, 1], perplexity as is)."""
        def mean(s: ItemScores | None) -> float | None:
            return s.mean if s else None

        return {
            "tasks": {t: s.mean for t, s in self.tasks.items()},
            "harmful_refusal_rate": mean(self.harmful_refusal),
            "benign_over_refusal_rate": mean(self.benign_refusal),
            "ifeval_strict": mean(self.ifeval_strict),
            "ifeval_loose": mean(self.ifeval_loose),
            "perplexity": self.perplexity.perplexity if self.perplexity else None,
            "general_chat_distinct_ratio": self.general_chat.distinct_ratio() if self.general_chat else None,
            "general_chat_mean_words": self.general_chat.mean_words() if self.general_chat else None,
            "general_chat_parent_nll": mean(self.chat_vs_parent),
            "facts_stated": sum(self.facts.stated) / max(1, len(self.facts.stated)) if self.facts else None,
        }
