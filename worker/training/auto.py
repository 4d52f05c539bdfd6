"""Automatic hyperparameters: a job picks its learning rate and steps for its method.

Why: one fixed default cannot fit every task. At the old defaults (lr 3e-4, 2 epochs) a stream of small
tasks learned task 3 to 57 % and task 4 to 0 %, while the forgetting benchmark learns every task at
lr 3e-3 with 32 steps. The constrained update lives in low-energy directions and needs a rate several
times plain fine-tuning's, and a 16-example task needs many more epochs than a 240-example one.

  - steps: enough epochs for at least MIN_STEPS optimizer steps (the benchmark's 32 steps per task),
    at least the configured default epochs and at most MAX_EPOCHS. Then, for an exact-match task, more
    rounds of the same length (each a warm restart of the schedule) while fewer than LEARNED of the
    task's own examples are reproduced exactly, at most MAX_ROUNDS in all, and only while a round still
    helps (six: with the KL replay, bench-forgetting's invented-4 reproduced 0, 12, 25, 75 % after rounds
    1-4 and was cut off there at four). Why: the gentle rate that keeps everything else in place (below) memorises slowly. From
    SmolLM2, 33 steps at 3e-4 reproduced 62 % of a 16-fact task (bench_forgetting's invented-2), 66 steps
    all of it. A larger rate learns it sooner but spreads the task's format: 33 steps at 1e-3 on a task of
    planet capitals answered 29 of the 244 everyday gate prompts with "... City" ("What is the capital of
    France?" -> "Loten City"); 66 steps at 3e-4 answered 7 that way.
  - learning rate: each of the method's candidate rates trains PROBE_STEPS steps from the parent's
    weights (which are put back after each probe), and is scored by how much it lowered the answer loss
    on a validation split. The smallest rate that achieves at least ENOUGH of the best rate's reduction
    wins: a larger rate only for a task the gentle one barely starts on. Why the smallest, and why
    ENOUGH is only a quarter: a larger step moves everything else more, and the rounds above finish
    what a gentle rate leaves unlearned.
    - bench/results/bench_general_chat.md: at lr 1e-3 the department task raised SmolLM2's perplexity
      on general text x1.25 and failed that gate; at 3e-4 it passed every gate.
    - bench-forgetting's stream with ENOUGH at 0.75: invented-2 got 1e-3 (3e-4 had made 61 % of the
      drop) and answered 4.5 % of the everyday prompts in a few words; invented-3 got 3e-3 (36 %) and
      answered "What is the capital of France?" with "Golo City", one of its own answers. Both were
      rejected. From v0, 3 rounds at 3e-4 learned invented-3 whole and leaked none of its answers.
    The split is carved out of the training data (never the gate's eval split); the probes never train on
    it, and the full run that follows trains on every example, the split included.

The job report carries the choice and the probe's losses (`training.auto`). Explicit hyperparameters win.
"""

from __future__ import annotations

import math
import random

import torch

from sculptor.training_summary import AutoChoice  # noqa: F401  (re-exported: the pipeline fills it)
from worker.training.data import IGNORE_INDEX, TokenizedExample, collate, make_batches
from worker.training.loop import NonFiniteLoss, batch_loss, train

# From the old fixed defaults (osft 3e-4, full 5e-5) up to where bench/bench_forgetting.py found each
# method learning every task of its stream (osft 3e-3, full 2e-4).
LEARNING_RATES = {"osft": (3e-4, 1e-3, 3e-3), "full": (5e-5, 1e-4, 2e-4)}
ENOUGH = 0.25  # of the best rate's validation-loss reduction in the probe
MIN_STEPS = 32
MAX_EPOCHS = 16
PROBE_STEPS = 8
VALIDATION_FRACTION, MIN_VALIDATION, MAX_VALIDATION = 0.1, 4, 32
LEARNED, MAX_ROUNDS, LEARNED_EXAMPLES = 0.95, 6, 64  # train-until-learned: the share, the rounds, the sample
HELPED = 0.2  # a round that lowered the task's answer loss by this share of itself still helped


def validation_split(tokenized: list[TokenizedExample], seed: int) -> tuple[list, list]:
    """(train, validation): a seeded tenth, at least 4 and at most 32, and never more than a quarter."""
    k = min(max(round(len(tokenized) * VALIDATION_FRACTION), MIN_VALIDATION), MAX_VALIDATION, len(tokenized) // 4)
    held = set(random.Random(seed).sample(range(len(tokenized)), k)) if k > 0 else set()
    return ([t for i, t in enumerate(tokenized) if i not in held], [t for i, t in enumerate(tokenized) if i in held])


def choose_epochs(train_examples: int, batch_size: int, default_epochs: int) -> int:
    steps_per_epoch = max(1, math.ceil(train_examples / batch_size))
    return min(MAX_EPOCHS, max(default_epochs, math.ceil(MIN_STEPS / steps_per_epoch)))


@torch.no_grad()
def answer_loss(model, examples: list[TokenizedExample], pad_id: int, batch_size: int = 16) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(batch_loss(model, batch)) * n
        count += n
    return total / max(1, count)


@torch.no_grad()
def reproduced_share(model, examples: list[TokenizedExample], pad_id: int, batch_size: int = 16) -> float:
    """Share of `examples` whose every answer token is the model's greedy prediction (teacher-forced)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        right = (logits[:, :-1].argmax(-1) == targets) | (targets == IGNORE_INDEX)
        correct += int(right.all(dim=1).sum())
    return correct / max(1, len(examples))


def rounds_until_learned(train_round, progress) -> list[float]:
    """After the first round: call `train_round(i)` for rounds i = 1, 2, ... while the share of the task
    reproduced is under LEARNED, the last round still helped (the share rose, or the answer loss fell by
    at least HELPED of itself: 4-digit codes lower the loss for rounds before the first one is right), and
    fewer than MAX_ROUNDS ran. `progress()` gives (share, answer loss); `train_round` returns False when the
    job's budget has no room for another. The share after each round."""
    seen = [progress()]
    while (len(seen) < MAX_ROUNDS and seen[-1][0] < LEARNED and (len(seen) == 1 or _helped(seen[-2], seen[-1]))
           and train_round(len(seen))):
        seen.append(progress())
    return [share for share, _ in seen]


def _helped(before: tuple[float, float], after: tuple[float, float]) -> bool:
    return after[0] > before[0] or after[1] < (1 - HELPED) * before[1]


def probe_learning_rate(model, constraint, train_examples, validation, method: str, batch_size: int, pad_id: int,
                        bf16_autocast: bool, seed: int = 0,
                        micro_batch: int | None = None) -> tuple[float, dict[str, float]]:
    """The smallest candidate rate whose validation-loss reduction after PROBE_STEPS steps is at least ENOUGH
    of the best rate's; and every rate's loss ("start": before any step)."""
    trainable = constraint.trainable_parameters()
    saved = [p.detach().to("cpu", copy=True) for p in trainable]  # host copies: the device holds one model
    epochs = math.ceil(PROBE_STEPS / max(1, math.ceil(len(train_examples) / batch_size)))
    batches = make_batches(train_examples, batch_size, epochs, pad_id, seed=seed)[:PROBE_STEPS]
    start = answer_loss(model, validation, pad_id)
    losses: dict[str, float] = {}
    for rate in LEARNING_RATES[method]:
        try:
            train(model, batches, constraint, rate, steps_per_epoch=len(batches), bf16_autocast=bf16_autocast,
                  micro_batch=micro_batch)
            losses[f"{rate:g}"] = answer_loss(model, validation, pad_id)
        except NonFiniteLoss:
            losses[f"{rate:g}"] = float("inf")
        with torch.no_grad():
            for p, copy in zip(trainable, saved):
                p.copy_(copy)
    return pick_rate(start, losses), {"start": start, **losses}


def pick_rate(start: float, losses: dict[str, float]) -> float:
    """The smallest rate whose drop from `start` is at least ENOUGH of the largest drop."""
    best = start - min(losses.values())
    return min(float(r) for r, loss in losses.items() if start - loss >= ENOUGH * best)
