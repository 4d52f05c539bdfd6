"""Turn chat examples into token batches with the loss on assistant tokens only."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class ParentDistribution:
    """The parent's next-token distribution at each learned position of one example: its `k` most likely
    tokens, and the rest of the vocabulary as one more outcome holding the remaining mass
    (worker/training/replay.py: with_parent_distribution). Training on it is a KL term to the parent there,
    in place of the cross-entropy on the example's own tokens."""

    positions: list[int]  # label positions (indices into input_ids) the distribution predicts
    token_ids: torch.Tensor  # [len(positions), k]
    probs: torch.Tensor  # [len(positions), k]; 1 - a row's sum is the parent's mass on every other token


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    parent: ParentDistribution | None = None  # soft targets for this example's answer (None: its own tokens)


def tokenize_chat(tokenizer, messages: list[dict], max_seq_len: int) -> TokenizedExample:
    """Render `messages` with the chat template, turn by turn, labelling assistant turns only.

    Each turn is the text the template adds for it, so the labels line up with the
    template's own tokens without relying on offsets. Truncates to `max_seq_len`.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            _append(tokenizer, prompt[len(rendered):], input_ids, labels, learn=False)
            rendered = prompt
        text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        _append(tokenizer, text[len(rendered):], input_ids, labels, learn=message["role"] == "assistant")
        rendered = text
    return TokenizedExample(input_ids[:max_seq_len], labels[:max_seq_len], len(input_ids) > max_seq_len)


def _append(tokenizer, text: str, input_ids: list[int], labels: list[int], learn: bool) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids.extend(ids)
    labels.extend(ids if learn else [IGNORE_INDEX] * len(ids))


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any(e.parent is not None for e in examples):
        batch["target_ids"], batch["target_probs"] = soft_targets(examples, labels)
    return batch


def soft_targets(examples: list[TokenizedExample], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, width, k] token ids and probabilities to learn at each position: the parent's top k where an
    example has them (what they leave is the rest of the vocabulary's, loop.py: batch_loss), else all of the
    mass on the label (so that row's loss is its cross-entropy)."""
    k = max(e.parent.token_ids.shape[1] for e in examples if e.parent is not None)
    ids = torch.zeros((*labels.shape, k), dtype=torch.long)
    probs = torch.zeros((*labels.shape, k))
    for row, e in enumerate(examples):
        if e.parent is None:
            learned = labels[row] != IGNORE_INDEX
            ids[row, learned, 0] = labels[row, learned]
            probs[row, learned, 0] = 1.0
        else:
            positions, width = torch.tensor(e.parent.positions, dtype=torch.long), e.parent.token_ids.shape[1]
            ids[row, positions, :width] = e.parent.token_ids.long()
            probs[row, positions, :width] = e.parent.probs.float()
    return ids, probs


class Batches(Sequence):
    """The job's batches in order; each is collated only when it is read, so a long job holds token ids, not
    every epoch's tensors. Slicing gives a Batches of the same examples (e.g. the first epoch's)."""

    def __init__(self, examples: list[TokenizedExample], order: list[list[int]], pad_id: int):
        self.examples, self.order, self.pad_id = examples, order, pad_id

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Batches(self.examples, self.order[index], self.pad_id)
        return collate([self.examples[i] for i in self.order[index]], self.pad_id)

    def tokens(self) -> int:
        """Tokens the optimizer will see, padding excluded."""
        return sum(len(self.examples[i].input_ids) for batch in self.order for i in batch)


def make_batches(tokenized: list[TokenizedExample], batch_size: int, epochs: int, pad_id: int, seed: int = 0) -> Batches:
    """Shuffled batches for all epochs (a fixed order, so total_steps is known up front)."""
    rng = random.Random(seed)
    usable = [e for e in tokenized if any(label != IGNORE_INDEX for label in e.labels)]
    order = []
    for _ in range(epochs):
        shuffled = list(range(len(usable)))
        rng.shuffle(shuffled)
        order += [shuffled[start:start + batch_size] for start in range(0, len(shuffled), batch_size)]
    return Batches(usable, order, pad_id)
