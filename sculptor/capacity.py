"""The SVD-constrained method's capacity: its configuration (which matrices, how much of each to protect)
and the rank rule (the protected rank k of a matrix, and the room k and the task memory leave).

Pure (no torch): the worker plans its jobs with it (worker/osft/), and the subspace registry's summary
(sculptor/subspace_records.py), which the gateway serves, reports the capacity left with it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Attention and MLP projections of Llama-like models; embeddings, norms and lm_head stay frozen.
DEFAULT_TARGETS = r"\.(q|k|v|o|gate|up|down)_proj$"
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class OSFTConfig:
    # Linear layers (module names, regex search) trained under the constraint.
    target_pattern: str = DEFAULT_TARGETS
    # Extra parameters (parameter names, regex search) trained without a constraint, e.g. r"norm".
    unconstrained_pattern: str | None = None
    # Protected ratio k/m: the mean over layers, spread within [min, max] by importance.
    mean_protected_ratio: float = 0.75
    min_protected_ratio: float = 0.5
    max_protected_ratio: float = 0.95
    adaptive_ranks: bool = True
    # The trainable remainder (1 - ratio) is multiplied by this once per task the parent absorbed.
    remainder_decay: float = 0.85
    # Capacity policy. With the task memory on, k grows with tasks (and inherits the parent's k) only up
    # to max(this, the task's own ratio) of m: the memory protects earlier tasks' inputs, so every matrix
    # keeps >= 1 - this of its rank trainable for any number of tasks. 1.0 restores unbounded growth, which
    # spends every matrix after 6-20 tasks (bench/bench_capacity.py). Without the memory growth is unbounded.
    max_grown_ratio: float = 0.9
    # A matrix whose trainable remainder m - k is below max(1, this fraction of m) is spent: frozen.
    min_trainable_ratio: float = 0.02
    # Task memory (worker/osft/memory.py): also keep updates off the input directions of earlier tasks.
    task_memory: bool = True
    memory_energy: float = 0.97  # share of each task's input energy its memory must cover
    # At most this share of the input directions the top-k rule leaves trainable goes to the memory
    # (its strongest directions), so every new task keeps room to learn.
    memory_share: float = 0.5
    # Seed the memory once per lineage with the input directions of everyday chat (bench-forgetting's
    # osft-chat-memory rows measure it; off by default).
    general_chat_memory: bool = False

    def __post_init__(self) -> None:
        if not self.min_protected_ratio <= self.mean_protected_ratio <= self.max_protected_ratio:
            raise ValueError("protected ratios need min <= mean <= max")
        if not 0 < self.remainder_decay <= 1:
            raise ValueError("remainder_decay must be in (0, 1]")
        if not 0 < self.max_grown_ratio <= 1:
            raise ValueError("max_grown_ratio must be in (0, 1]")
        if not (0 <= self.memory_energy <= 1 and 0 <= self.memory_share <= 1):
            raise ValueError("memory_energy and memory_share must be in [0, 1]")
        re.compile(self.target_pattern)

    # The knobs a task may set for itself (sculptor.datasets.Hyperparameters has a field of the same name for
    # each, None meaning this default); the rest are the service's.
    PER_TASK = ("mean_protected_ratio", "min_protected_ratio", "max_protected_ratio", "adaptive_ranks",
                "task_memory", "memory_energy", "general_chat_memory")

    @classmethod
    def from_hyperparameters(cls, hp) -> "OSFTConfig":
        """The defaults with the task's own values (those it set) on top."""
        given = {name: getattr(hp, name) for name in cls.PER_TASK if getattr(hp, name, None) is not None}
        mean = given.get("mean_protected_ratio", cls.mean_protected_ratio)
        # A mean outside the default range widens the range rather than being refused.
        given.setdefault("min_protected_ratio", min(cls.min_protected_ratio, mean))
        given.setdefault("max_protected_ratio", max(cls.max_protected_ratio, mean))
        return cls(**given)


def layer_index(name: str) -> int | None:
    """The decoder layer a matrix belongs to (`model.layers.3.mlp.up_proj` -> 3)."""
    match = _LAYER_INDEX.search(name + ".")
    return int(match.group(1)) if match else None


def allocate_rank(m: int, ratio: float, tasks_absorbed: int, floor: int, config: OSFTConfig) -> int:
    """Protected rank: the ratio's trainable remainder shrinks per absorbed task, never below `floor`;
    with the task memory, never above max(ratio, max_grown_ratio) of m (OSFTConfig.max_grown_ratio)."""
    remainder = (1.0 - ratio) * config.remainder_decay ** tasks_absorbed
    k = min(m, max(round((1.0 - remainder) * m), floor))
    if config.task_memory:
        k = min(k, round(max(ratio, config.max_grown_ratio) * m))
    return k


def trainable_rank(shape: tuple[int, int], k: int, memory_rank: int, memory_share: float = 1.0) -> int:
    """The rank an update of an out × in matrix may still have: the top k are protected on both sides,
    and on the input side up to `memory_share` of what k leaves goes to `memory_rank` memory directions."""
    out_features, in_features = shape
    memory = min(memory_rank, int(memory_share * (in_features - k)))
    return max(0, min(out_features - k, in_features - k - memory))


def is_spent(m: int, k: int, config: OSFTConfig) -> bool:
    """No room left to learn in: the trainable remainder is below the configured minimum."""
    return m - k < max(1, math.ceil(config.min_trainable_ratio * m))
