"""One training job, start to finish: load → train → save candidate → gate → promote.

Each step is one function below; `run_job` is the whole flow in one screen. The job record
moves queued → running → evaluating → promoted | rejected | failed | cancelled | superseded, and
nothing is promoted unless every step before it finished and the head is still the job's parent.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sculptor import accuracy, checkpoints, lineage
from sculptor.context import Context
from sculptor.datasets import Example, load_examples
from sculptor.gate_report import GateSummary, LineageAccuracy
from sculptor.records import HeadMoved, JobEnded, JobRecord, Progress, TaskRecord
from sculptor.training_summary import TrainingSummary
from worker import gate_step, osft
from worker.training import data as training_data
from worker.training import auto, rehearsal, replay, sharded_round
from worker.training.device import load_model, resolve_train_device, use_bf16
from worker.training.loop import LRSchedule, NonFiniteLoss, TrainingCancelled, train

log = logging.getLogger("sculptor.worker")
MEMORY_BATCHES = 32  # batches of the task's data that measure its input directions (one epoch, capped)
CHAT_MEMORY_EXAMPLES = 64  # everyday answers that seed a general-chat memory when the job replays none


class JobTooLarge(RuntimeError):
    """The job would train on more tokens than `max_training_tokens` allows."""


class JobTimeLimit(RuntimeError):
    """The job ran past `job_time_limit_s`."""


class Deadline:
    """The job's wall-time bound. Checked at every training step and before the gates; a Celery time limit
    would not do, since the solo pool the worker runs (one job owns the accelerator) ignores it."""

    def __init__(self, limit_s: float):
        self.limit_s, self.ends = limit_s, time.monotonic() + limit_s

    def remaining_s(self) -> float:
        return self.ends - time.monotonic()

    def check(self, where: str) -> None:
        if time.monotonic() > self.ends:
            raise JobTimeLimit(f"the job ran past its time limit of {self.limit_s:.0f} s {where} "
                               f"(SCULPTOR_JOB_TIME_LIMIT_S); upload fewer examples or set fewer epochs or max_steps")


@dataclass
class Candidate:
    version: str
    checkpoint_uri: str
    model_dir: Path
    parent_dir: Path
    training: TrainingSummary


# JobRecord.error_code of each failure a job can end with.
FAILURE_CODES = {NonFiniteLoss: "non_finite_loss", JobTooLarge: "job_too_large", JobTimeLimit: "job_time_limit",
                 osft.CapacityExhausted: osft.CapacityExhausted.code,
                 sharded_round.ShardedTrainingFailed: sharded_round.ShardedTrainingFailed.code}


def run_job(ctx: Context, job_id: str, check_lock=lambda: None) -> JobRecord:
    """`check_lock` raises (sculptor.locks.LockLost) once this worker lost the job's lock: the job stops."""
    job = ctx.jobs.get(job_id)
    if job is None or job.finished:
        return job  # a re-delivery of a job that already ended: nothing to do
    if job.cancel_requested:
        return ctx.jobs.update(job_id, status="cancelled", error="cancelled before it started")
    parent = ctx.versions.current()
    try:
        job = ctx.jobs.update(job_id, status="running", parent_version=parent, attempts=job.attempts + 1,
                              error=None, error_code=None, progress=Progress())
    except JobEnded:
        return ctx.jobs.get(job_id)  # cancelled between the check above and now
    task = ctx.tasks.get(job.task_id)
    deadline = Deadline(ctx.settings.job_time_limit_s)
    try:
        candidate = train_candidate(ctx, job, task, parent, deadline, check_lock)
        deadline.check("before its gates")
        ctx.jobs.update(job_id, status="evaluating", candidate_version=candidate.version,
                        training=candidate.training)
        report = gate_step.evaluate_candidate(ctx, task, parent, candidate.version, candidate.model_dir,
                                           candidate.parent_dir)
        if not report.passed:
            rejected = ctx.jobs.update(job_id, status="rejected", gates=report, error=report.summary)
            prune_registry(ctx)  # the candidate's bases go; its memory stays for a force-promotion
            return rejected
        if ctx.jobs.get(job_id).cancel_requested:
            return ctx.jobs.update(job_id, status="cancelled", gates=report,
                                   error="cancelled during evaluation; the candidate was not promoted")
        check_lock()
        lineage.promote_candidate(ctx.versions, ctx.store, job, candidate.version,
                                  GateSummary(passed=report.passed, summary=report.summary, failed=report.failed))
        report.lineage = LineageAccuracy.model_validate(accuracy.accuracy_matrix(ctx, candidate.version))
        promoted = ctx.jobs.update(job_id, status="promoted", gates=report)
        prune_registry(ctx)
        return promoted
    except TrainingCancelled as err:
        return ctx.jobs.update(job_id, status="cancelled", error=str(err))
    except tuple(FAILURE_CODES) as err:
        return ctx.jobs.update(job_id, status="failed", error=str(err), error_code=FAILURE_CODES[type(err)])
    except HeadMoved as err:  # from promote_candidate(): e.g. an admin rolled back while this job trained
        return ctx.jobs.update(job_id, status="superseded", gates=report,
                               error=f"{err}; its gates passed: resubmit the task to retrain it on {err.head}")


def prune_registry(ctx: Context) -> None:
    """Keep the subspace bases of the head and the SCULPTOR_REGISTRY_KEEP_BASES newest promoted versions only
    (rejected candidates and older versions lose theirs; every task memory stays)."""
    keep = {ctx.versions.current(), *ctx.versions.ids(limit=ctx.settings.registry_keep_bases)}
    try:
        pruned = osft.SubspaceRegistry(ctx.redis, ctx.store).prune_bases(keep)
    except Exception:  # housekeeping: it never changes a verdict, and the next job's pruning retries it
        log.exception("pruning the subspace registry failed")
        return
    if pruned:
        log.info("pruned the subspace bases of %s (kept: %s)", ", ".join(pruned), ", ".join(sorted(keep - {None})))


@dataclass
class TrainingData:
    examples: int  # the task's own
    replayed: int  # the parent's answers to everyday prompts (worker/training/replay.py)
    rehearsed: dict[str, int]  # earlier tasks' own examples, per task id (worker/training/rehearsal.py)
    train: list  # tokenized: what the optimizer sees
    own: list  # tokenized: the task's part of `train`
    validation: list  # tokenized, held out of the task's examples while the learning rate is chosen
    truncated: int
    max_seq_len: int
    replay: list  # tokenized: the replayed part of `train`
    replay_kl: bool  # `replay` carries the parent's distribution (replay.with_parent_distribution)


def training_data_for(ctx: Context, task: TaskRecord, parent: str, model, tokenizer,
                      split_validation: bool) -> TrainingData:
    hp, settings = task.hyperparameters, ctx.settings
    examples = load_examples(ctx.store, task.dataset_uri)
    share = settings.default_general_replay if hp.general_replay is None else hp.general_replay
    replayed = replay.replay_examples(model, tokenizer, share, len(examples), hp.seed,
                                      task_prompts=[e.last_user_turn for e in examples])
    rehearsed = rehearsal_for(ctx, task, parent, len(examples))
    max_len = hp.max_seq_len or settings.default_max_seq_len

    def tokenized(part: list[Example]) -> list:
        return [training_data.tokenize_chat(tokenizer, [m.model_dump() for m in e.messages], max_len) for e in part]

    own, extra = tokenized(examples), tokenized(replayed)
    replay_kl = settings.default_general_replay_kl if hp.general_replay_kl is None else hp.general_replay_kl
    if replay_kl and extra:
        extra = replay.with_parent_distribution(model, extra, tokenizer.pad_token_id)
    earlier = tokenized([e for drawn in rehearsed.values() for e in drawn])
    own, validation = auto.validation_split(own, hp.seed) if split_validation else (own, [])
    truncated = sum(t.truncated for t in own + extra + earlier + validation)  # policy: truncate, and say how many
    return TrainingData(len(examples), len(replayed), {t: len(drawn) for t, drawn in rehearsed.items()},
                        own + extra + earlier, own, validation, truncated, max_len, extra, bool(replay_kl and extra))


def rehearsal_for(ctx: Context, task: TaskRecord, parent: str, task_examples: int) -> dict[str, list[Example]]:
    """Earlier tasks' own examples for this job, per task id (none unless task_replay is set)."""
    hp = task.hyperparameters
    share = ctx.settings.default_task_replay if hp.task_replay is None else hp.task_replay
    if share <= 0:
        return {}
    learned = [task_id for _, task_id in accuracy.lineage_tasks(ctx, parent)]
    earlier = [ctx.tasks.get(t) for t in rehearsal.tasks_to_rehearse(learned, hp.task_replay_from)]
    earlier = [t for t in earlier if t is not None]
    return rehearsal.rehearsal_examples(ctx.store, earlier, share, task_examples, hp.seed)


def chat_memory_batches(hp, model, tokenizer, data: TrainingData, batch_size: int) -> list | None:
    """Everyday prompts with the parent's answers, for a task memory seeded with general chat (off by default)."""
    if not osft.OSFTConfig.from_hyperparameters(hp).general_chat_memory:
        return None
    tokenized = data.replay or [
        training_data.tokenize_chat(tokenizer, [m.model_dump() for m in e.messages], data.max_seq_len)
        for e in replay.replay_examples(model, tokenizer, 1.0, CHAT_MEMORY_EXAMPLES, hp.seed)]
    return training_data.make_batches(tokenized, batch_size, 1, tokenizer.pad_token_id, seed=hp.seed)


def choose_learning_rate(ctx: Context, hp, model, constraint, data: TrainingData, batch_size: int, pad_id: int,
                         bf16: bool, epochs: int, steps: int) -> tuple[float, auto.AutoChoice | None]:
    if not data.validation:
        fixed = hp.learning_rate if isinstance(hp.learning_rate, float) else None
        return fixed or ctx.settings.default_learning_rate[hp.method], None
    rate, probe = auto.probe_learning_rate(model, constraint, data.train, data.validation, hp.method, batch_size,
                                           pad_id, bf16, hp.seed, micro_batch=ctx.settings.train_micro_batch)
    return rate, auto.AutoChoice(
        learning_rate=rate, epochs=epochs, steps=steps, validation_examples=len(data.validation),
        probe_validation_loss=probe,
        reason=f"the smallest rate that made {auto.ENOUGH:.0%} of the best rate's drop in answer loss on "
               f"{len(data.validation)} held-out training examples after {auto.PROBE_STEPS} steps; "
               f"{epochs} epochs for at least {auto.MIN_STEPS} steps, then up to {auto.MAX_ROUNDS} rounds "
               f"of them while under {auto.LEARNED:.0%} of the task's examples are reproduced")


def planned_batches(examples: list, batch_size: int, epochs: int, pad_id: int, seed: int,
                    max_steps: int | None) -> training_data.Batches:
    """One round's batches: the epochs in a seeded order, cut at max_steps."""
    batches = training_data.make_batches(examples, batch_size, epochs, pad_id, seed=seed)
    return batches[:max_steps] if max_steps else batches


def check_token_budget(batches: training_data.Batches, limit: int, examples: int, epochs: int) -> None:
    tokens = batches.tokens()
    if tokens > limit:
        raise JobTooLarge(f"the job would train on {tokens:,} tokens ({examples} examples over {epochs} epochs), "
                          f"more than SCULPTOR_MAX_TRAINING_TOKENS={limit:,}; upload fewer or shorter examples, "
                          f"or set fewer epochs or max_steps")


def train_candidate(ctx: Context, job: JobRecord, task: TaskRecord, parent: str,
                    deadline: Deadline, check_lock=lambda: None) -> Candidate:
    settings = ctx.settings
    hp = task.hyperparameters
    parent_dir = checkpoints.fetch(ctx.store, parent, settings.checkpoint_cache_dir)
    ranks = settings.train_gpus  # > 1: every round trains on that many processes; this one keeps the model on the CPU
    device = resolve_train_device("cpu" if ranks > 1 else settings.train_device)
    model, tokenizer = load_model(parent_dir, device)
    auto_lr, auto_epochs = (_is_auto(v, settings.auto_hyperparameters) for v in (hp.learning_rate, hp.epochs))
    data = training_data_for(ctx, task, parent, model, tokenizer, split_validation=auto_lr)
    batch_size = hp.batch_size or settings.default_batch_size
    # The validation split only chooses the learning rate (on probes that never see it); the run itself
    # then trains on every example, so a task of facts that exist nowhere else can still be learned whole.
    everything = data.train + data.validation
    epochs = (auto.choose_epochs(len(everything), batch_size, settings.default_epochs) if auto_epochs
              else hp.epochs or settings.default_epochs)
    batches = planned_batches(everything, batch_size, epochs, tokenizer.pad_token_id, hp.seed, hp.max_steps)
    check_token_budget(batches, settings.max_training_tokens, len(everything), epochs)
    steps_per_epoch = max(1, -(-len(everything) // batch_size))

    registry = osft.SubspaceRegistry(ctx.redis, ctx.store)
    constraint = osft.build_constraint(model, hp, parent, registry, batches[:4],
                                       chat_batches=chat_memory_batches(hp, model, tokenizer, data, batch_size))
    bf16 = use_bf16(settings.train_bf16, device)
    learning_rate, chosen = choose_learning_rate(ctx, hp, model, constraint, data, batch_size, tokenizer.pad_token_id,
                                                 bf16, epochs, len(batches))

    schedule = LRSchedule(settings.train_warmup_fraction, settings.train_min_lr_ratio)
    rank_bases = ranks_bases(registry, parent, constraint) if ranks > 1 else None
    world_sizes: list[int] = []

    def train_round(round_batches, done_steps: int = 0):
        def on_progress(p):
            ctx.jobs.update(job.job_id, progress=replace(p, step=p.step + done_steps,
                                                         total_steps=p.total_steps + done_steps))

        def should_stop():
            return deadline.check("while training") or check_lock() or ctx.jobs.get(job.job_id).cancel_requested

        if ranks > 1:
            done = sharded_round.train_round_on_ranks(
                ranks, model, round_batches, constraint, rank_bases, learning_rate, steps_per_epoch,
                use_bf16(settings.train_bf16, ranks_device()), schedule, on_progress, should_stop)
            world_sizes.append(done.world_size)  # what the ranks reported, for the job's summary
            return done.result
        return train(model, round_batches, constraint, learning_rate=learning_rate, steps_per_epoch=steps_per_epoch,
                     bf16_autocast=bf16, schedule=schedule, micro_batch=settings.train_micro_batch,
                     on_progress=on_progress, should_stop=should_stop)

    torch.manual_seed(hp.seed)
    rounds = [train_round(batches)]
    reproduced = []
    if auto_epochs and task.metric == "exact_match":
        reproduced = more_rounds_until_learned(settings, hp, rounds, train_round, batches, everything, deadline,
                                               model, data, tokenizer.pad_token_id, batch_size, epochs)
    result = rounds[-1]
    version = ctx.versions.next_name()
    uri = checkpoints.save_model(ctx.store, model, tokenizer, version)
    lineage.announce_candidate(ctx.versions, version)
    subspace = osft.record_version(registry, model, version, parent, task.task_id, constraint,
                                   memory_batches=batches[:min(steps_per_epoch, MEMORY_BATCHES)])
    steps = sum(r.steps for r in rounds)
    training = TrainingSummary.model_validate({"steps": steps, "final_loss": result.final_loss, "examples": data.examples,
                "replayed_examples": data.replayed, "replay_kl": data.replay_kl, "rehearsed_examples": data.rehearsed, "learning_rate": learning_rate, "epochs": epochs,
                "auto": chosen.model_dump() if chosen else None,
                "truncated_examples": data.truncated, "max_seq_len": data.max_seq_len, "mean_step_s": round(sum(r.mean_step_s * r.steps for r in rounds) / max(1, steps), 4),
                "train_processes": max(world_sizes, default=1),
                "rounds": len(rounds), "reproduced_share": reproduced,
                "method": hp.method, "constraint": constraint.report(), "subspace": subspace})
    del model
    model_dir = checkpoints.fetch(ctx.store, version, settings.checkpoint_cache_dir)
    return Candidate(version, uri, model_dir, parent_dir, training)


def ranks_bases(registry: osft.SubspaceRegistry, parent: str, constraint) -> dict | None:
    """What the ranks of a sharded round protect: the parent's bases of the matrices this job projects (from the
    registry, where build_constraint just loaded or stored them) with the task memory this job uses; None for
    method "full"."""
    if not isinstance(constraint, osft.SubspaceConstraint):
        return None
    names = list(constraint.projectors)
    weights = {name: constraint.targets[name].weight for name in names}  # still the parent's: no round has run
    bases = registry.load_bases(parent, weights, {name: constraint.plans[name].k for name in names}) if names else {}
    if bases is None:
        raise sharded_round.ShardedTrainingFailed(f"the subspace bases of {parent} are not in the registry, "
                                                  "so the ranks cannot share them")
    for name in names:
        bases[name].memory = constraint.memory.get(name)
    return bases


def ranks_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def more_rounds_until_learned(settings, hp, rounds: list, train_round, batches, everything: list, deadline: Deadline,
                              model, data: TrainingData, pad_id: int, batch_size: int, epochs: int) -> list[float]:
    """auto.rounds_until_learned for this job: each further round reshuffles the same epochs, and runs only
    if the job's token budget and time limit leave room for it (else the job keeps what it learned). Appends
    to `rounds`; returns the share of the task's own examples reproduced after each round."""
    own = data.own + data.validation
    sample = random.Random(hp.seed).sample(own, min(auto.LEARNED_EXAMPLES, len(own)))
    tokens = [batches.tokens()]

    def another(i: int) -> bool:
        more = planned_batches(everything, batch_size, epochs, pad_id, hp.seed + i, hp.max_steps)
        round_s = rounds[-1].mean_step_s * len(more)  # room for the round, and as long again for the gates
        if sum(tokens) + more.tokens() > settings.max_training_tokens or deadline.remaining_s() < 2 * round_s:
            return False
        tokens.append(more.tokens())
        rounds.append(train_round(more, sum(r.steps for r in rounds)))
        return True

    return auto.rounds_until_learned(another, lambda: (auto.reproduced_share(model, sample, pad_id),
                                                       auto.answer_loss(model, sample, pad_id)))


def _is_auto(value, auto_by_default: bool) -> bool:
    return value == "auto" or (value is None and auto_by_default)
