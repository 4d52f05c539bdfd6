"""The SVD-constrained update (method "osft"): plan the protected ranks, then hold every step to them.

`plan_matrices` decides, per target matrix, the protected rank k; `require_capacity` refuses a plan
with nothing left to train; `SubspaceConstraint` freezes everything else and makes the optimizer that
projects every applied update (optimizer.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sculptor.capacity import OSFTConfig, allocate_rank, is_spent
from sculptor.subspace_records import SubspaceRecord
from worker.osft.importance import matrix_importance, protected_ratios
from worker.osft.optimizer import ProjectedAdamW
from worker.osft.projector import Projector
from worker.osft.subspace import Bases, unfreeze_extras
from worker.training.loop import ADAM_BETAS


@dataclass
class MatrixPlan:
    m: int
    k: int
    protected_ratio: float      # k / m actually protected
    importance: float | None    # the layer score that set the ratio (None: uniform or no score)
    spent: bool                 # no capacity left: frozen
    memory_rank: int = 0        # input directions of earlier tasks protected beyond V_k (memory.py)


def plan_matrices(
    shapes: dict[str, tuple[int, int]],
    importance: dict[int, float],
    parent_record: SubspaceRecord | dict | None,
    config: OSFTConfig,
) -> dict[str, MatrixPlan]:
    """Protected rank per matrix from importance, the number of absorbed tasks and the parent's ranks.

    `parent_record`: the parent's registry record, or (bench/bench_capacity.py, tests) just what planning
    reads of one, {"tasks": [...], "matrices": {name: {"k": k}}}."""
    if isinstance(parent_record, SubspaceRecord):
        tasks_absorbed, floors = len(parent_record.tasks), {n: m.k for n, m in parent_record.matrices.items()}
    else:
        tasks_absorbed = len(parent_record["tasks"]) if parent_record else 0
        floors = {n: m["k"] for n, m in (parent_record["matrices"] if parent_record else {}).items()}
    names = list(shapes)
    ratios = protected_ratios(names, importance, config)
    scores = matrix_importance(names, importance) if config.adaptive_ranks else dict.fromkeys(names)
    plans = {}
    for name, shape in shapes.items():
        m = min(shape)
        floor = floors.get(name, 0)
        k = allocate_rank(m, ratios[name], tasks_absorbed, floor, config)
        plans[name] = MatrixPlan(m=m, k=k, protected_ratio=k / m, importance=scores[name],
                                 spent=is_spent(m, k, config))
    return plans


class CapacityExhausted(RuntimeError):
    """No target matrix has room left to learn in: the job fails with code `capacity_exhausted`."""

    code = "capacity_exhausted"

    def __init__(self, spent: list[str], config: OSFTConfig, tasks_absorbed: int):
        self.spent = spent
        shown = ", ".join(spent[:3]) + (f" and {len(spent) - 3} more" if len(spent) > 3 else "")
        remedies = ["lower the protected ratios (mean_protected_ratio, max_protected_ratio)",
                    "or have an admin activate an earlier version to branch from (POST /models/{version}/activate)"]
        if not config.task_memory:
            remedies.insert(0, f"resubmit with task_memory on (without it k grows with every task, "
                               f"{tasks_absorbed} so far; with it k stops at max_grown_ratio="
                               f"{config.max_grown_ratio} of each matrix)")
        super().__init__(f"no room left to learn: all {len(spent)} target matrices are spent ({shown}); "
                         + ", ".join(remedies))


def require_capacity(plans: dict[str, MatrixPlan], config: OSFTConfig, tasks_absorbed: int) -> None:
    """Raise CapacityExhausted when every target matrix is spent (the optimizer would get no parameter)."""
    if plans and all(plan.spent for plan in plans.values()):
        raise CapacityExhausted(list(plans), config, tasks_absorbed)


class SubspaceConstraint:
    """UpdateConstraint for method "osft" (see worker.training.loop)."""

    def __init__(
        self,
        model: torch.nn.Module,
        targets: dict[str, torch.nn.Linear],
        plans: dict[str, MatrixPlan],
        bases: dict[str, Bases],
        config: OSFTConfig,
        parent_tasks: list[str],
        timings: dict[str, float],
        registry_hit: bool,
    ):
        self.config = config
        self.plans = plans
        self.parent_tasks = parent_tasks
        self.timings = timings
        self.registry_hit = registry_hit
        self.targets = targets
        self.projectors: dict[str, Projector] = {}
        self.memory: dict[str, torch.Tensor | None] = {}  # the parent's task memory, grown after training
        self.general_chat_memory = False  # the memory holds everyday chat's directions (build_constraint)
        self.memory_lost: list[str] = []  # matrices whose parent memory was in the record but not loadable
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self._trainable: list[torch.nn.Parameter] = []
        for name, module in targets.items():
            plan = plans[name]
            if plan.spent:
                continue
            if plan.k > 0:
                self.memory[name] = bases[name].memory  # kept for the next job even when this one opts out
                memory = self.memory[name] if config.task_memory else None
                self.projectors[name] = Projector(module.weight, bases[name], plan.k, memory, config.memory_share)
                plan.memory_rank = self.projectors[name].memory_rank
            module.weight.requires_grad_(True)
            self._trainable.append(module.weight)
        self._trainable += unfreeze_extras(model, config)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._trainable)

    def make_optimizer(self, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
        return projected_adamw(self, learning_rate, weight_decay)

    def report(self) -> dict:
        return {
            "method": "osft",
            "registry_hit": self.registry_hit,
            **{key: round(value, 3) for key, value in self.timings.items()},
            "adaptive_ranks": self.config.adaptive_ranks,
            "task_memory": self.config.task_memory,
            "general_chat_memory": self.general_chat_memory and self.config.task_memory,
            "memory_lost": self.memory_lost,
            "tasks_absorbed": len(self.parent_tasks),
            **capacity_report(self.plans),
        }


def projected_adamw(constraint, learning_rate: float, weight_decay: float) -> ProjectedAdamW:
    """The optimizer of a constraint with `targets`, `projectors` (by matrix name) and trainable parameters."""
    projectors = {constraint.targets[name].weight: p for name, p in constraint.projectors.items()}
    return ProjectedAdamW(constraint.trainable_parameters(), projectors, lr=learning_rate,
                          weight_decay=weight_decay, betas=ADAM_BETAS)


def capacity_report(plans: dict[str, MatrixPlan]) -> dict:
    """How much is protected overall, which matrices still train, and each matrix's plan."""
    spent = [name for name, plan in plans.items() if plan.spent]
    total_m = sum(plan.m for plan in plans.values())
    return {
        "protected_fraction": round(sum(plan.k for plan in plans.values()) / total_m, 4),
        "memory_fraction": round(sum(plan.memory_rank for plan in plans.values()) / total_m, 4),
        "trainable_matrices": len(plans) - len(spent),
        "spent_matrices": spent,
        "matrices": {name: asdict(plan) for name, plan in plans.items()},
    }
