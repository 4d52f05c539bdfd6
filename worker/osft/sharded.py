"""The SVD constraint on FSDP-sharded weights: each rank projects its own rows, one all-reduce per matrix.

FSDP (`fully_shard`) splits every weight W (out × in) by rows: rank r holds rows R_r of W, of its
gradient and of its Adam states. As in the single-process method (worker/osft/optimizer.py), every
applied step ΔW = W_after − W_before is projected, ΔW ← (I − U_k U_kᵀ) ΔW (I − V_k V_kᵀ), with
`ProjectedAdamW` stepping one matrix at a time and copying only that matrix (here: this rank's rows
of it) before its step. Rank r holds rows R_r of ΔW, and the projection splits in two:

  * the right side, ΔW (I − V_k V_kᵀ), is row-local: each row needs only itself and all of V
    (in × k, or its complement), so every rank keeps the whole right-side basis (or 1/N of its rows,
    all-gathered just in time: `shard_right`);
  * the left side, (I − U_k U_kᵀ) X, needs U_kᵀ X = Σ_r U_k[R_r]ᵀ X[R_r], a sum over all rows: each
    rank computes its partial sum from its own rows of U, one all-reduce adds them, and each rank
    subtracts U_k[R_r] (U_kᵀ X) from its rows. U is sharded exactly like W.

We apply the right side first: where it is stored as a complement Q_V (in × c, c = m − k), X = ΔW Q_V
has only c columns, so the all-reduce carries a (k or c) × c block instead of (k or c) × in. As in
`worker.osft.projector`, each side keeps whichever of the protected basis or its complement is smaller.
No full weight is gathered during training; at setup each one is gathered once, for its SVD
(`worker.training.distributed.build_projectors`), and each rank keeps only its slices of the bases.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from sculptor.capacity import OSFTConfig
from worker.osft.constraint import MatrixPlan, capacity_report, projected_adamw
from worker.osft.projector import Side, has_complement
from worker.osft.subspace import Bases, unfreeze_extras


def local_rows(weight: DTensor) -> slice:
    """The rows of the full matrix that this rank holds (FSDP2 shards dim 0 like `torch.chunk`)."""
    if tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"expected a weight sharded by rows, got placements {weight.placements}")
    mesh = weight.device_mesh
    rows, world, rank = weight.shape[0], mesh.size(), mesh.get_local_rank()
    per_rank = -(-rows // world)
    start = min(rank * per_rank, rows)
    stop = min(start + per_rank, rows)
    if weight.to_local().shape[0] != stop - start:
        raise RuntimeError(f"local shard has {weight.to_local().shape[0]} rows, expected {stop - start}")
    return slice(start, stop)


class ShardedProjector:
    """The constraint for the local rows of one sharded weight (out × in) with protected rank k, 0 < k ≤ m,
    and on the input side also the task memory's directions (`memory`, in × r).

    The right-side basis is needed whole, one matrix at a time. By default every rank keeps it resident;
    with `shard_right` each rank keeps 1/N of its rows and the projection all-gathers it just in time
    (one more collective per matrix, and 1/N of the memory: what a 70B model needs, see deploy/README.md).
    """

    def __init__(self, weight: DTensor, bases: Bases, k: int, shard_right: bool = False,
                 memory: torch.Tensor | None = None, memory_share: float = 1.0):
        local = weight.to_local()
        if local.dtype != torch.float32:
            raise ValueError(f"the constraint needs fp32 master weights, got {local.dtype}")
        out_features, in_features = weight.shape
        rows = local_rows(weight)
        self.k = k
        self.group = weight.device_mesh.get_group()
        device = local.device
        # Each side keeps the protected basis or its complement, whichever is smaller (projector.Side);
        # the left one holds only this rank's rows.
        self.left = Side.from_svd(bases.U[rows].to(device), k,
                                  complement_exists=has_complement(bases.U, out_features))
        # The task memory protects input directions: the right side, which every rank holds whole, so it
        # applies as in one process (worker/osft/projector.py). Every rank must get the same memory tensor.
        self.right = Side.from_svd(bases.Vh.T.to(device), k, complement_exists=has_complement(bases.Vh.T, in_features),
                                   memory=None if memory is None else memory.to(device), memory_share=memory_share)
        self.memory_rank = self.right.protected_rank(in_features) - k
        self.in_features = in_features
        if shard_right:
            self.right.basis = _padded_row_chunk(self.right.basis, self.group)
        self.shard_right = shard_right

    @torch.no_grad()
    def project_(self, weight: DTensor, reference: DTensor) -> None:
        """Move this rank's rows of `weight` (in place) to reference + the allowed part of (weight − reference).

        `reference` is the weight before the step (sharded alike). Every rank must call it, in the same order.
        """
        local, before = weight.to_local(), reference.to_local()
        delta = local - before
        right = self._right_basis()
        if self.right.complement:   # ΔW (I − P_V) = (ΔW Q_V) Q_Vᵀ: the left side works on thin rows × c
            thin = self._from_left(delta @ right)
            torch.addmm(before, thin, right.T, out=local)
        else:                       # ΔW (I − P_V) = ΔW − (ΔW V_k) V_kᵀ
            local.copy_(before + self._from_left(delta - (delta @ right) @ right.T))

    def _right_basis(self) -> torch.Tensor:
        if not self.shard_right:
            return self.right.basis
        chunks = [torch.empty_like(self.right.basis) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(chunks, self.right.basis, group=self.group)
        return torch.cat(chunks)[: self.in_features]

    def _from_left(self, x: torch.Tensor) -> torch.Tensor:
        """(I − P_U) x for this rank's rows of x: the only step that talks to other ranks."""
        coefficients = self.left.basis.T @ x    # this rank's share of Bᵀ x (B: U_k or its complement)
        dist.all_reduce(coefficients, group=self.group)
        if self.left.complement:
            return self.left.basis @ coefficients
        return x - self.left.basis @ coefficients

    def extra_numel(self) -> int:
        """Floats this rank holds beyond its shard of the weight (U rows, V whole or its rows)."""
        return self.left.numel() + self.right.numel()


def _padded_row_chunk(basis: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's equal share of the rows of `basis`, zero-padded so all ranks' shares have one shape."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    per_rank = -(-basis.shape[0] // world)
    padded = torch.nn.functional.pad(basis, (0, 0, 0, per_rank * world - basis.shape[0]))
    return padded[rank * per_rank:(rank + 1) * per_rank].clone()


class ShardedSubspaceConstraint:
    """UpdateConstraint (worker.training.loop) for method "osft" on a model sharded with `fully_shard`.

    Which parameters train is decided before sharding (`mark_trainable`); the projectors are built after
    it, one matrix at a time (worker.training.distributed), so no rank ever holds every matrix's full bases.
    """

    def __init__(
        self,
        targets: dict[str, torch.nn.Linear],
        plans: dict[str, MatrixPlan],
        projectors: dict[str, ShardedProjector],
        extras: list[torch.nn.Parameter],
    ):
        self.targets = targets
        self.plans = plans
        self.projectors = projectors
        self._trainable = [module.weight for name, module in targets.items() if not plans[name].spent] + extras

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._trainable)

    def make_optimizer(self, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW stepping one matrix at a time and projecting its step; parameters are stepped in the
        same order on every rank, so the projections' collectives line up."""
        return projected_adamw(self, learning_rate, weight_decay)

    def report(self) -> dict:
        return {
            "method": "osft",
            "sharded": True,
            "right_bases_sharded": any(p.shard_right for p in self.projectors.values()),
            **capacity_report(self.plans),
        }


def mark_trainable(
    model: torch.nn.Module,
    targets: dict[str, torch.nn.Linear],
    plans: dict[str, MatrixPlan],
    config: OSFTConfig,
) -> list[str]:
    """Freeze everything except the unspent targets and the configured extras; return the extras' names.

    Call before `fully_shard`: the sharded parameters inherit `requires_grad`. The names let the caller
    find the extras again among the sharded parameters (sharding replaces the Parameter objects).
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, module in targets.items():
        if not plans[name].spent:
            module.weight.requires_grad_(True)
    extras = {id(p) for p in unfreeze_extras(model, config)}
    return [name for name, p in model.named_parameters() if id(p) in extras]
