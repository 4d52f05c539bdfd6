"""The fixed evaluation suites (shipped under `suites/`, or a user's files in the same formats).

  harmful.jsonl       {"id", "category", "prompt"}  a refusal is expected
  benign.jsonl        {"id", "category", "prompt"}  look-alikes of harmful requests; an answer is expected
  ifeval.jsonl        IFEval's format {"key", "prompt", "instruction_id_list", "kwargs"}
  general_text.jsonl  {"id"?, "text"}               held-out prose for perplexity
  general_chat.jsonl  {"id", "category", "prompt"}  everyday chat (12 kinds, 244 prompts): the candidate
                                                    is compared with its parent's own answers to them
  facts.jsonl         {"id", "category", "prompt", "answers"}  short factual questions (130: 50 capitals,
                                                    80 others) with the words a right answer states; the
                                                    candidate must keep stating the facts its parent states

`load_suites` can subsample each suite (seeded, so the parent and the candidate see the same items).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field, model_validator

from worker.gates.ifeval import IFEvalItem

SHIPPED = Path(__file__).parent / "suites"


def _content_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class PromptItem(BaseModel):
    id: str = ""
    category: str = ""
    prompt: str

    @model_validator(mode="after")
    def _default_id(self):
        self.id = self.id or _content_id(self.prompt)
        return self


class FactItem(PromptItem):
    answers: list[str] = Field(min_length=1)  # any of these, as a whole word or phrase, states the fact


class TextItem(BaseModel):
    id: str = ""
    text: str

    @model_validator(mode="after")
    def _default_id(self):
        self.id = self.id or _content_id(self.text)
        return self


class SuiteSizes(BaseModel):
    """How many items of each suite the gate uses (None: all)."""

    harmful: int | None = None
    benign: int | None = None
    ifeval: int | None = None
    general_text: int | None = None
    general_chat: int | None = None
    facts: int | None = None


# What the gate uses by default: sized to keep a job's gate within minutes on 2 CPU cores
# (bench/bench_gates.py measures it); the shipped files hold more for machines that can afford them.
GATE_SIZES = SuiteSizes(harmful=32, benign=24, ifeval=32, general_text=16, general_chat=None)


class Suites(BaseModel):
    harmful: list[PromptItem]
    benign: list[PromptItem]
    ifeval: list[IFEvalItem]
    general_text: list[TextItem]
    general_chat: list[PromptItem] = []
    facts: list[FactItem] = []


M = TypeVar("M", bound=BaseModel)


def read_jsonl(path: Path, model: type[M]) -> list[M]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [model.model_validate(json.loads(line)) for line in lines if line.strip()]


def subsample(items: list[M], size: int | None, seed: int) -> list[M]:
    """`size` items drawn with `seed`, kept in file order (all of them when size is None or larger)."""
    if size is None or size >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), size))
    return [item for i, item in enumerate(items) if i in keep]


def load_suites(
    harmful: Path | None = None,
    benign: Path | None = None,
    ifeval: Path | None = None,
    general_text: Path | None = None,
    general_chat: Path | None = None,
    facts: Path | None = None,
    sizes: SuiteSizes | None = None,
    seed: int = 0,
) -> Suites:
    """The suites from the given files (default: the shipped ones), each subsampled to `sizes`."""
    sizes = sizes or SuiteSizes()
    return Suites(
        harmful=subsample(read_jsonl(harmful or SHIPPED / "harmful.jsonl", PromptItem), sizes.harmful, seed),
        benign=subsample(read_jsonl(benign or SHIPPED / "benign.jsonl", PromptItem), sizes.benign, seed),
        ifeval=subsample(read_jsonl(ifeval or SHIPPED / "ifeval.jsonl", IFEvalItem), sizes.ifeval, seed),
        general_text=subsample(read_jsonl(general_text or SHIPPED / "general_text.jsonl", TextItem),
                               sizes.general_text, seed),
        general_chat=subsample(read_jsonl(general_chat or SHIPPED / "general_chat.jsonl", PromptItem),
                               sizes.general_chat, seed),
        facts=subsample(read_jsonl(facts or SHIPPED / "facts.jsonl", FactItem), sizes.facts, seed),
    )
