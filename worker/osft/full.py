"""The unconstrained baseline (method "full"): dense fine-tuning of the same target matrices."""

from __future__ import annotations

import re

import torch

from worker.osft.config import OSFTConfig
from worker.osft.subspace import target_modules


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
        if self.config.unconstrained_pattern:
            pattern = re.compile(self.config.unconstrained_pattern)
            for name, parameter in model.named_parameters():
                if pattern.search(name) and not parameter.requires_grad:
                    parameter.requires_grad_(True)
                    self._trainable.append(parameter)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._trainable)

    def after_optimizer_step(self) -> None:
        pass

    def report(self) -> dict:
        return {
            "method": "full",
            "registry_hit": False,
            "tasks_absorbed": len(self.parent_tasks),
            "trainable_matrices": len(self.targets),
            "trainable_parameters": sum(p.numel() for p in self._trainable),
            "spent_matrices": [],
        }
