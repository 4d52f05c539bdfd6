"""The unconstrained baseline (method "full"): dense fine-tuning of the same target matrices."""

from __future__ import annotations


import torch

from sculptor.capacity import OSFTConfig
from worker.osft.subspace import target_modules, unfreeze_extras
from worker.training.loop import adamw


class FullFineTuning:
    """UpdateConstraint that trains the target matrices (and configured extras) without projection."""

    def __init__(self, model: torch.nn.Module, config: OSFTConfig | None = None, parent_tasks: list[str] | None = None):
        self.config = config or OSFTConfig()
        self.parent_tasks = parent_tasks or []
        self.targets = target_modules(model, self.config)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self._trainable = [module.weight for module in self.targets.values()]
        for parameter in self._trainable:
            parameter.requires_grad_(True)
        self._trainable += unfreeze_extras(model, self.config)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._trainable)

    def make_optimizer(self, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
        return adamw(self.trainable_parameters(), learning_rate, weight_decay)

    def report(self) -> dict:
        return {
            "method": "full",
            "registry_hit": False,
            "tasks_absorbed": len(self.parent_tasks),
            "trainable_matrices": len(self.targets),
            "trainable_parameters": sum(p.numel() for p in self._trainable),
            "spent_matrices": [],
        }
