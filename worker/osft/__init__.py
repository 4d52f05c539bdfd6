"""SVD-constrained full fine-tuning ("Sculpting Subspaces", arXiv 2504.07097) with a subspace registry.

The worker calls two functions around `worker.training.loop.train`:

    registry = SubspaceRegistry(redis_client, object_store)      # redis.Redis(decode_responses=True)
    constraint = build_constraint(model, hyperparameters, parent_version, registry, importance_batches)
    train(model, batches, constraint, ...)
    record = record_version(registry, model, candidate_version, parent_version, task_id, constraint,
                            memory_batches=one_epoch_of_batches)
    job_report["method"] = constraint.report()

`build_constraint` handles both methods of `Hyperparameters.method`: "osft" (this method) and "full"
(the unconstrained baseline over the same matrices). For "osft" it loads the parent's bases from the
registry (or runs the SVD and stores them, so the next job on that parent does not), scores the
layers on `importance_batches` (a few training batches), plans the protected ranks and freezes
everything else. `record_version` computes the SVD of the trained weights and stores the new
version's record and bases, so the next job loads them. The pipeline calls it for every candidate
(a rejected one may be force-promoted) and prunes the bases it no longer needs after the verdict
(SubspaceRegistry.prune_bases); the task memory stays. `constraint.report()` is JSON-able:
method, registry_hit, svd_s / load_s, protected_fraction, spent_matrices and per-matrix m / k.

Modules: subspace (targets, SVD), importance (layer scores), projector (the per-matrix projection),
memory (task memory: earlier tasks' input directions), constraint (SubspaceConstraint), full
(FullFineTuning), registry (SubspaceRegistry: the records and their bases). OSFTConfig and the rank rule
are sculptor/capacity.py's, and the registry's records are read through sculptor/subspace_records.py, which
the gateway serves as GET /registry.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from sculptor.capacity import OSFTConfig
from sculptor.subspace_records import MatrixRecord, SubspaceRecord
from worker.osft.constraint import CapacityExhausted, SubspaceConstraint, plan_matrices, require_capacity
from worker.osft.full import FullFineTuning
from worker.osft.importance import layer_importance
from worker.osft.memory import grow_memory, input_covariances
from worker.osft.registry import SubspaceRegistry
from worker.osft.subspace import Bases, compute_bases, target_modules

__all__ = ["OSFTConfig", "SubspaceRegistry", "SubspaceConstraint", "FullFineTuning", "CapacityExhausted",
           "build_constraint", "record_version"]
log = logging.getLogger("sculptor.worker")


def build_constraint(
    model: torch.nn.Module,
    hyperparameters,
    parent_version: str,
    registry: SubspaceRegistry | None,
    importance_batches: list[dict[str, torch.Tensor]],
    config: OSFTConfig | None = None,
    chat_batches: list[dict[str, torch.Tensor]] | None = None,
) -> SubspaceConstraint | FullFineTuning:
    """The UpdateConstraint for `hyperparameters.method` on a model loaded from `parent_version`.

    `chat_batches` (everyday prompts with the parent's answers): with `config.general_chat_memory` and a
    lineage whose memory holds no chat yet, their input directions join the memory as one more task."""
    config = config or OSFTConfig.from_hyperparameters(hyperparameters)
    parent_record = registry.get(parent_version) if registry else None
    parent_tasks = list(parent_record.tasks) if parent_record else []
    if hyperparameters.method == "full":
        return FullFineTuning(model, config, parent_tasks)

    targets = target_modules(model, config)
    started = time.monotonic()
    importance = layer_importance(model, importance_batches) if config.adaptive_ranks else {}
    importance_s = time.monotonic() - started
    shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
    plans = plan_matrices(shapes, importance, parent_record, config)
    require_capacity(plans, config, len(parent_tasks))
    trainable = [name for name, plan in plans.items() if not plan.spent]
    bases, timings, hit = _parent_bases(targets, {name: plans[name].k for name in trainable}, parent_version,
                                        parent_record, registry)
    device = next(iter(targets.values())).weight.device
    bases = {name: b.to(device) for name, b in bases.items()}  # the registry's tensors load on the CPU
    timings["importance_s"] = importance_s
    parent_matrices = parent_record.matrices if parent_record else {}
    lost = [name for name in trainable if bases[name].memory is None
            and name in parent_matrices and parent_matrices[name].memory_directions]
    if lost:
        log.warning("the task memory of %d matrices of %s could not be loaded: %s", len(lost), parent_version, lost)
    seeded = bool(parent_record and parent_record.general_chat_memory)
    if config.task_memory and config.general_chat_memory and chat_batches and not seeded:
        _grow_memories(model, targets, bases, {name: b.memory for name, b in bases.items()}, chat_batches, config)
        seeded = True
    constraint = SubspaceConstraint(model, targets, plans, bases, config, parent_tasks, timings, hit)
    constraint.general_chat_memory = seeded  # the memory holds everyday chat (kept even when this job opts out)
    constraint.memory_lost = lost
    return constraint


def _parent_bases(
    targets: dict[str, torch.nn.Linear],
    ranks: dict[str, int],
    parent_version: str,
    parent_record: SubspaceRecord | None,
    registry: SubspaceRegistry | None,
) -> tuple[dict[str, Bases], dict[str, float], bool]:
    """Bases of the matrices that train (`ranks`: their planned k): from the registry, else by SVD (then
    stored, with the parent's task memory, which no SVD can recompute)."""
    names = list(ranks)
    started = time.monotonic()
    weights = {name: targets[name].weight for name in names}  # still the parent's: no step has run
    bases = registry.load_bases(parent_version, weights, ranks) if registry else None
    if bases is not None:
        return bases, {"load_s": time.monotonic() - started}, True

    started = time.monotonic()
    bases = {name: compute_bases(targets[name].weight) for name in names}
    timings = {"svd_s": time.monotonic() - started}
    if registry:
        for name, memory in registry.load_memory(parent_version, names).items():
            bases[name].memory = memory
        uri = registry.store_bases(parent_version, bases)
        record = parent_record or _root_record(parent_version, targets)
        registry.put(dataclasses.replace(record, bases_uri=uri, stored_bytes=registry.stored_bytes(parent_version)))
    return bases, timings, False


def _root_record(version: str, targets: dict[str, torch.nn.Linear]) -> SubspaceRecord:
    """A version nobody trained here (the base model): nothing protected yet, no tasks."""
    return SubspaceRecord(version=version, parent_version=None, tasks=[], matrices=_unprotected(targets))


def _unprotected(targets: dict[str, torch.nn.Linear]) -> dict[str, MatrixRecord]:
    return {name: MatrixRecord(m=min(module.weight.shape), shape=list(module.weight.shape), k=0, importance=None,
                               protected_ratio=0.0, spent=False) for name, module in targets.items()}


def record_version(
    registry: SubspaceRegistry,
    model: torch.nn.Module,
    version: str,
    parent_version: str,
    task_id: str,
    constraint: SubspaceConstraint | FullFineTuning,
    memory_batches: list[dict[str, torch.Tensor]] | None = None,
) -> SubspaceRecord:
    """Store `version`'s record and bases (SVD of the trained weights) for the next job; returns the record,
    which keeps the method and the resolved OSFTConfig the version was trained with.

    After "osft" each matrix keeps the rank it protected as the floor for later jobs; after "full"
    nothing was protected, so the floors restart at zero (the task count still grows protection).
    With `memory_batches` (the task's training data) and task memory on, the parent's memory grows
    by this task's input directions; otherwise (e.g. a job with `task_memory: false`) it passes on
    unchanged; after "full" the memory restarts from this task.
    """
    targets = constraint.targets
    if isinstance(constraint, SubspaceConstraint):
        matrices = {name: MatrixRecord(m=p.m, shape=list(targets[name].weight.shape), k=p.k,
                                       importance=p.importance, protected_ratio=round(p.protected_ratio, 4),
                                       spent=p.spent)
                    for name, p in constraint.plans.items()}
    else:
        matrices = _unprotected(targets)
    started = time.monotonic()
    bases = {name: compute_bases(targets[name].weight) for name in targets if not matrices[name].spent}
    svd_s = time.monotonic() - started
    parent_memory = getattr(constraint, "memory", {})
    if memory_batches and constraint.config.task_memory:
        _grow_memories(model, targets, bases, parent_memory, memory_batches, constraint.config)
    else:
        for name, b in bases.items():
            b.memory = parent_memory.get(name)
    for name, b in bases.items():  # stored whole; the next job protects its strongest (Side.from_svd)
        if b.memory is not None:
            matrices[name].memory_directions = b.memory.shape[1]
    uri = registry.store_bases(version, bases)
    record = SubspaceRecord(
        version=version, parent_version=parent_version, tasks=[*constraint.parent_tasks, task_id], bases_uri=uri,
        stored_bytes=registry.stored_bytes(version), matrices=matrices, svd_s=round(svd_s, 3),
        general_chat_memory=bool(getattr(constraint, "general_chat_memory", False)),
        method="osft" if isinstance(constraint, SubspaceConstraint) else "full", config=constraint.config)
    return registry.put(record)


def _grow_memories(model, targets, bases: dict[str, Bases], parent_memory: dict, batches, config: OSFTConfig) -> None:
    """Attach to each matrix's bases the parent's task memory grown by this task's inputs."""
    covariances = input_covariances(model, {name: targets[name] for name in bases}, batches)
    for name, b in bases.items():
        b.memory = grow_memory(parent_memory.get(name), covariances[name], config.memory_energy)
