"""Task datasets: the upload format, its validation, the per-task hyperparameters, and reading one back.

An example is either `{"messages": [...]}` (OpenAI fine-tuning format) or
`{"prompt": str, "completion": str}`; both normalise to a list of chat messages.
Validation errors carry the 1-based line (JSONL) or index (JSON body) so a person can fix the file.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sculptor.gate_report import GateThresholds
from sculptor.storage import ObjectStore
from sculptor.text import check_text

Role = Literal["system", "user", "assistant"]
Metric = Literal["exact_match", "contains", "rougeL"]
Method = Literal["osft", "full"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str


class Example(BaseModel):
    """One training example, normalised to chat messages ending in an assistant turn."""

    model_config = ConfigDict(extra="forbid")
    messages: list[Message]

    @model_validator(mode="before")
    @classmethod
    def _from_prompt_completion(cls, data):
        if isinstance(data, dict) and "messages" not in data and ("prompt" in data or "completion" in data):
            if not isinstance(data.get("prompt"), str) or not isinstance(data.get("completion"), str):
                raise ValueError("a prompt/completion example needs string fields 'prompt' and 'completion'")
            extra = set(data) - {"prompt", "completion"}
            if extra:
                raise ValueError(f"unexpected fields {sorted(extra)}")
            return {"messages": [{"role": "user", "content": data["prompt"]},
                                 {"role": "assistant", "content": data["completion"]}]}
        return data

    @model_validator(mode="after")
    def _needs_assistant_turn(self):
        if not self.messages:
            raise ValueError("'messages' is empty")
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("no assistant turn: each example needs at least one assistant message to learn from")
        if self.messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        return self

    @property
    def prompt_messages(self) -> list[dict]:
        """The conversation up to (not including) the final assistant answer."""
        return [m.model_dump() for m in self.messages[:-1]]

    @property
    def last_user_turn(self) -> str:
        """What the user last said before the answer (the prompt, for a prompt/completion example)."""
        return next((m.content for m in reversed(self.messages[:-1]) if m.role == "user"), "")

    @property
    def answer(self) -> str:
        return self.messages[-1].content


class Hyperparameters(BaseModel):
    """Per-task training settings. Every number is bounded, so one task cannot hold the worker for hours
    or overflow a seed; the bounds are far beyond what the method needs (see README)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    method: Method = "osft"
    # "auto" (or None while SCULPTOR_AUTO_HYPERPARAMETERS is on, the default): the job chooses
    # (worker/training/auto.py); a number always wins.
    epochs: int | Literal["auto"] | None = None  # 1 to 64
    learning_rate: float | Literal["auto"] | None = None  # above 0, at most 0.1
    batch_size: int | None = Field(None, ge=1, le=256)
    max_seq_len: int | None = Field(None, ge=16, le=8192)
    max_steps: int | None = Field(None, ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's limit
    # SVD-constrained method (osft): protected ratios, see sculptor/capacity.py.
    mean_protected_ratio: float | None = Field(None, ge=0, le=0.999)
    min_protected_ratio: float | None = Field(None, ge=0, le=0.999)
    max_protected_ratio: float | None = Field(None, ge=0, le=0.999)
    adaptive_ranks: bool | None = None
    task_memory: bool | None = None  # also protect the input directions of earlier tasks
    memory_energy: float | None = Field(None, ge=0, le=1)
    # Self-distillation replay (worker/training/replay.py): the parent's answers to everyday prompts, as a
    # share of the task's example count; None: the settings' default, 0: off.
    general_replay: float | None = Field(None, ge=0, le=4)
    # Learn the replayed answers as the parent's next-token distribution (a KL term to the parent) rather
    # than as the sampled tokens alone; None: the settings' default (on).
    general_replay_kl: bool | None = None
    # Rehearsal (worker/training/rehearsal.py): earlier tasks' own training examples, as a share of this task's
    # example count, split equally over them; None: the settings' default (0: off). `task_replay_from` limits
    # it to these task ids (default: every task the parent's lineage learned).
    task_replay: float | None = Field(None, ge=0, le=4)
    task_replay_from: list[Annotated[str, Field(max_length=64)]] | None = Field(None, max_length=100)
    # Seed the task memory with the input directions of everyday chat (the parent's answers to the replay
    # pool), protected like an earlier task from the first job on; None: OSFTConfig's default (off).
    general_chat_memory: bool | None = None
    # Gate thresholds for this task (sculptor/gate_report.py), stricter ones only and from admin keys only
    # (service/api/routes/tasks.py); None: the settings' defaults.
    gate_thresholds: dict[str, float | bool] | None = None

    @field_validator("epochs")
    @classmethod
    def _epochs_bounded(cls, value):
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError(f'must be from 1 to 64, or "auto" (got {value})')
        return value

    @field_validator("learning_rate")
    @classmethod
    def _learning_rate_bounded(cls, value):
        if isinstance(value, float) and not 0 < value <= 0.1:
            raise ValueError(f'must be above 0 and at most 0.1, or "auto" (got {value})')
        return value

    @model_validator(mode="after")
    def _protected_ratios_ordered(self):
        given = [(n, getattr(self, n)) for n in ("min_protected_ratio", "mean_protected_ratio", "max_protected_ratio")
                 if getattr(self, n) is not None]
        if any(low > high for (_, low), (_, high) in zip(given, given[1:])):
            raise ValueError("protected ratios need min_protected_ratio <= mean_protected_ratio <= max_protected_ratio"
                             f" (got {', '.join(f'{n}={v}' for n, v in given)})")
        return self


class DatasetError(ValueError):
    """A dataset that cannot be accepted; `line` is 1-based where it applies."""

    def __init__(self, message: str, line: int | None = None, code: str = "invalid_dataset"):
        super().__init__(message)
        self.message = message
        self.line = line
        self.code = code


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_example(obj: object, line: int | None) -> Example:
    if not isinstance(obj, dict):
        raise DatasetError("an example must be a JSON object", line)
    try:
        return Example.model_validate(obj)
    except ValidationError as err:
        raise DatasetError(_describe(err), line) from None


def parse_examples(objs: list, what: str = "examples") -> list[Example]:
    if not objs:
        raise DatasetError(f"'{what}' is empty: a task needs at least one example", code="empty_dataset")
    return [parse_example(obj, i + 1) for i, obj in enumerate(objs)]


def parse_jsonl(raw: bytes) -> list[Example]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"the file is not UTF-8 text ({err.reason} at byte {err.start})") from None
    examples = []
    # JSONL lines end at "\n" only: str.splitlines() would also cut at U+2028 and other characters that a
    # JSON string may hold as they are.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"line {number} is not valid JSON: {err.msg} (column {err.colno})", number) from None
        except RecursionError:
            raise DatasetError(f"line {number} nests arrays or objects too deeply to read: an example is "
                               '{"messages": [{"role": ..., "content": "..."}]}', number) from None
        except ValueError as err:  # e.g. an integer of more than 4300 digits
            raise DatasetError(f"line {number} cannot be read: {err}", number) from None
        problem = check_text(obj, f"line {number}")
        if problem:
            raise DatasetError(problem, number, code="invalid_text")
        examples.append(parse_example(obj, number))
    if not examples:
        raise DatasetError("the file holds no examples", code="empty_dataset")
    return examples


def parse_hyperparameters(obj: object) -> Hyperparameters:
    try:
        hp = Hyperparameters.model_validate(obj or {})
        if hp.gate_thresholds:
            GateThresholds().check_overrides(hp.gate_thresholds)  # bad names and values fail here, not in the job
        return hp
    except ValidationError as err:
        raise DatasetError(f"hyperparameters: {_describe(err)}", code="invalid_hyperparameters") from None
    except ValueError as err:
        raise DatasetError(f"hyperparameters.gate_thresholds: {err}", code="invalid_hyperparameters") from None


def to_jsonl(examples: list[Example]) -> bytes:
    return "".join(json.dumps(e.model_dump(), ensure_ascii=False) + "\n" for e in examples).encode()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_examples(store: ObjectStore, uri: str) -> list[Example]:
    """A stored dataset (JSONL, as `to_jsonl` wrote it at upload) read back from the object store."""
    raw = store.get_bytes(store.key_of(uri))
    return [Example.model_validate(json.loads(line)) for line in raw.decode().splitlines() if line.strip()]
