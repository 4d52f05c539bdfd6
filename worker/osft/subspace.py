"""Target matrices and their singular value decompositions.

`Bases` is the reduced SVD of one weight (fp32): everything a later job needs to protect
any rank k of it. The rank rule itself (`allocate_rank` turns a protected ratio into k, applying the
growth rule; `trainable_rank` is the room that k and the task memory leave) is sculptor/capacity.py's.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sculptor.capacity import OSFTConfig

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
