"""Target matrices, their singular value decompositions, and the protected rank of each.

`Bases` is the reduced SVD of one weight (fp32): everything a later job needs to protect
any rank k of it. `allocate_rank` turns a protected ratio into k, applying the growth rule;
`trainable_rank` is the room that k and the task memory leave.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from worker.osft.config import OSFTConfig

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")
SINGLE_THREAD_SVD_MAX_DIM = 1024


@dataclass
class Bases:
    U: torch.Tensor   # out × m
    S: torch.Tensor   # m
    Vh: torch.Tensor  # m × in
    memory: torch.Tensor | None = None  # in × r: inputs of the tasks learned so far (worker/osft/memory.py)

    def to(self, device: torch.device) -> Bases:
        return Bases(*(None if t is None else t.to(device) for t in (self.U, self.S, self.Vh, self.memory)))


def target_modules(model: torch.nn.Module, config: OSFTConfig) -> dict[str, torch.nn.Linear]:
    """The linear layers the method trains, by module name, in model order."""
    pattern = re.compile(config.target_pattern)
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and pattern.search(name)}
    if not found:
        raise ValueError(f"no linear layer matches the target pattern {config.target_pattern!r}")
    return found


def unfreeze_extras(model: torch.nn.Module, config: OSFTConfig) -> list[torch.nn.Parameter]:
    """Make the configured extra parameters (`unconstrained_pattern`) trainable; return them."""
    if not config.unconstrained_pattern:
        return []
    pattern = re.compile(config.unconstrained_pattern)
    extras = [p for name, p in model.named_parameters() if pattern.search(name) and not p.requires_grad]
    for parameter in extras:
        parameter.requires_grad_(True)
    return extras


def layer_index(name: str) -> int | None:
    """The decoder layer a matrix belongs to (`model.layers.3.mlp.up_proj` -> 3)."""
    match = _LAYER_INDEX.search(name + ".")
    return int(match.group(1)) if match else None


def compute_bases(weight: torch.Tensor) -> Bases:
    """Reduced SVD in fp32 (looked up through torch.linalg at call time so tests can count calls)."""
    with _svd_threads(min(weight.shape)):
        U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return Bases(U.contiguous(), S.contiguous(), Vh.contiguous())


@contextmanager
def _svd_threads(m: int):
    """One thread for small matrices: LAPACK's threaded SVD gains little there and, on shared
    cores, was measured 10x slower than single-threaded (SmolLM2's 1536x576: 3.5 s vs 0.33 s)."""
    threads = torch.get_num_threads()
    if m <= SINGLE_THREAD_SVD_MAX_DIM:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
