"""The training loop: everything about a step is visible in `train`.

The method (SVD-constrained or plain) enters through an `UpdateConstraint`: it names the
parameters that train and makes the optimizer, whose every step keeps the applied update in the
allowed subspace (projecting only gradients leaks through Adam).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from sculptor.progress import Progress
from worker.training.data import IGNORE_INDEX
from worker.training.device import autocast, to_device


ADAM_BETAS = (0.9, 0.95)


def adamw(params: list[torch.nn.Parameter], learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=ADAM_BETAS)


class UpdateConstraint(Protocol):
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def make_optimizer(self, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer: ...

    def report(self) -> dict: ...


class AllParameters:
    """No constraint: every parameter trains (plain full fine-tuning of the whole model)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def make_optimizer(self, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
        return adamw(self.trainable_parameters(), learning_rate, weight_decay)

    def report(self) -> dict:
        return {"method": "all_parameters"}


class NonFiniteLoss(RuntimeError):
    pass


class TrainingCancelled(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    mean_step_s: float
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup over `warmup_fraction` of the steps, then cosine decay to `min_lr_ratio` of the peak
    (SCULPTOR_TRAIN_WARMUP_FRACTION, SCULPTOR_TRAIN_MIN_LR_RATIO)."""

    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1

    def warmup_steps(self, total: int) -> int:
        return max(1, int(total * self.warmup_fraction))

    def lr(self, step: int, total: int, peak: float) -> float:
        warmup = self.warmup_steps(total)
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        floor = self.min_lr_ratio
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss per learned token. A batch with soft targets (data.py: soft_targets; the parent's top-k
    distribution on replayed answers) learns each position's target distribution over the k tokens and
    "every other token" as one outcome: the cross-entropy to it, which is the KL term to the parent (on that
    coarser distribution) plus a constant, and exactly the token cross-entropy on one-hot rows.
    Why the tail outcome: renormalising the top k to 1 would teach the model to give no mass at all to the
    rest of the vocabulary there, sharpening it everywhere (the first run of this term raised perplexity on
    general text x1.106 after the department task, where the sampled replay stayed within x1.1).
    Hand-written because transformers' loss takes hard labels only."""
    if "target_ids" not in batch:
        return model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1].float()
    ids, probs = batch["target_ids"][:, 1:], batch["target_probs"][:, 1:]
    log_probs = logits.gather(-1, ids) - logits.logsumexp(-1, keepdim=True)
    rest = (1 - probs.sum(-1)).clamp(min=0)  # the target's mass outside the k tokens
    log_rest = torch.log1p(-log_probs.exp().sum(-1).clamp(max=1 - 1e-6))  # the model's
    learned = batch["labels"][:, 1:] != IGNORE_INDEX
    return -((probs * log_probs).sum(-1) + rest * log_rest)[learned].mean()


def micro_batches(batch: dict[str, torch.Tensor], size: int | None):
    """(part, weight) pairs: `batch` cut into runs of at most `size` rows, each weighted by its share of the
    batch's learned tokens, so the parts' weighted mean losses add up to the batch's mean loss."""
    rows = batch["input_ids"].shape[0]
    if not size or size >= rows:
        yield _unmasked(batch), 1.0
        return
    learned = batch["labels"][:, 1:] != IGNORE_INDEX
    total = max(1, int(learned.sum()))
    for start in range(0, rows, size):
        count = int(learned[start:start + size].sum())
        if count:  # a part with nothing to learn would give a NaN mean
            yield _unmasked({key: value[start:start + size] for key, value in batch.items()}), count / total


def _unmasked(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """No padding: without a mask transformers need not read it back."""
    if "attention_mask" in batch and batch["attention_mask"].all():
        return {key: value for key, value in batch.items() if key != "attention_mask"}
    return batch


def train(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    constraint: UpdateConstraint,
    learning_rate: float,
    steps_per_epoch: int,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    bf16_autocast: bool = True,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress_every_s: float = 2.0,
    schedule: LRSchedule = LRSchedule(),
    micro_batch: int | None = None,
) -> TrainResult:
    """`micro_batch`: at most this many examples per forward and backward (SCULPTOR_TRAIN_MICRO_BATCH), their
    gradients accumulated into one update per batch. Why: the constrained update's projection costs the
    same whatever the batch holds, so on a GPU a large batch in small micro-batches makes it a small share
    of the step at the memory of a small one (issue 16's goal: at most 10 % of a 7B step)."""
    params = constraint.trainable_parameters()
    optimizer = constraint.make_optimizer(learning_rate, weight_decay)
    total = len(batches)
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    started = last_report = time.monotonic()
    tokens = 0
    for step, batch in enumerate(batches):
        if should_stop and should_stop():
            raise TrainingCancelled(f"cancelled at step {step} of {total}")
        lr = schedule.lr(step, total, learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr

        tokens += int(batch["attention_mask"].sum())
        loss = torch.zeros((), device=device)
        for part, weight in micro_batches(batch, micro_batch):  # gradients add up; one update below
            with autocast(device, bf16_autocast):
                part_loss = batch_loss(model, to_device(part, device)) * weight
            part_loss.backward()
            loss += part_loss.detach()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()  # the constrained optimizer projects each applied update: once per batch
        optimizer.zero_grad(set_to_none=True)

        # The step's one read from the device. A non-finite loss has spoilt this step's weights: the job
        # fails (or auto.py's probe puts the parent's weights back).
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise NonFiniteLoss(f"loss became {losses[-1]} at step {step + 1}; try a lower learning_rate")
        now = time.monotonic()
        if on_progress and (now - last_report >= progress_every_s or step + 1 == total):
            last_report = now
            elapsed = now - started
            on_progress(Progress(
                step=step + 1, total_steps=total, epoch=(step + 1) / steps_per_epoch, loss=losses[-1],
                learning_rate=lr, tokens_per_s=tokens / elapsed,
                eta_s=elapsed / (step + 1) * (total - step - 1),
            ))
    model.eval()
    elapsed = time.monotonic() - started
    return TrainResult(steps=total, final_loss=losses[-1] if losses else float("nan"),
                       mean_step_s=elapsed / max(1, total), losses=losses)
