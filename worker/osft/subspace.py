"""Target matrices and their singular value decompositions.

`Bases` is the reduced SVD of one weight (fp32): everything a later job needs to protect
any rank k of it. The registry stores only one side of it (`stored_side`) and S; `from_stored_side` rebuilds
the other side's top k from the weight itself. The rank rule itself (`allocate_rank` turns a protected ratio into k, applying the
growth rule; `trainable_rank` is the room that k and the task memory leave) is sculptor/capacity.py's.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sculptor.capacity import OSFTConfig

SINGLE_THREAD_SVD_MAX_DIM = 1024


# A rebuilt singular vector's error is about eps·s_1/s_i (measured on SmolLM2, every matrix at k = 0.9 m: within
# 2.2e-6 of the SVD's entries after _orthonormal_columns). Below this s_k/s_1 the SVD runs again.
DERIVABLE_MIN_RATIO = 1e-3


@dataclass
class Bases:
    U: torch.Tensor   # out × m (out × k when derived: from_stored_side)
    S: torch.Tensor   # m
    Vh: torch.Tensor  # m × in (k × in when derived)
    memory: torch.Tensor | None = None  # in × r: inputs of the tasks learned so far (worker/osft/memory.py)

    def to(self, device: torch.device) -> Bases:
        return Bases(*(None if t is None else t.to(device) for t in (self.U, self.S, self.Vh, self.memory)))


def stored_side(shape: tuple[int, int]) -> str:
    """The side whose singular vectors the registry stores: the square one (U when out == m, else Vh).

    Why one side: the other follows from the weight, which every job loads anyway (W = U S Vh, so
    Vh_k = S_k⁻¹ U_kᵀ W and U_k = W V_k S_k⁻¹). The square side has the complement the projector prefers
    (projector.Side), and for SmolLM2 the stored bases shrink to a third. The derived side is only needed
    up to the job's own k, which is known when the bases are loaded."""
    out_features, in_features = shape
    return "U" if out_features <= in_features else "Vh"


def from_stored_side(singular_vectors: torch.Tensor, side: str, S: torch.Tensor, weight: torch.Tensor,
                     k: int) -> Bases | None:
    """Bases with the stored side whole and the other side's top k, from `weight` (the version's own, exactly
    as trained); None when s_k is too small against s_1 for that to be as exact as an SVD."""
    if k > 0 and not S[k - 1] > DERIVABLE_MIN_RATIO * S[0]:
        return None
    w = weight.detach().float()
    vectors, singular = singular_vectors.to(w.device), S.to(w.device)
    if side == "U":
        return Bases(vectors, singular, _orthonormal_columns((vectors[:, :k].T @ w).T / singular[:k]).T)
    return Bases(_orthonormal_columns((w @ vectors[:k].T) / singular[:k]), singular, vectors)


def _orthonormal_columns(nearly: torch.Tensor) -> torch.Tensor:
    """Columns that are orthonormal to fp32 precision and span, column by column, what `nearly`'s do (one
    Cholesky QR step). Why: the rebuilt vectors are orthonormal only to ~5e-5 (SmolLM2 at k = 0.9 m), and the
    projector I − BBᵀ is exact only for an orthonormal B."""
    if nearly.shape[1] == 0:
        return nearly
    factor = torch.linalg.cholesky(nearly.T @ nearly)
    return torch.linalg.solve_triangular(factor, nearly.T, upper=False).T


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
