"""Task memory: the input directions each learned task relies on, kept out of later updates.

Why this goes beyond the paper's rule. Protecting the top-k singular directions of the current
weights does not protect a task that was just learned: its update lives in the low-energy
directions, which are exactly where the next task trains. On bench-forgetting the paper's rule
alone forgot about as much as plain fine-tuning. So, after each task, every target matrix also
records the subspace that task's inputs span there (as Gradient Projection Memory, Saha et al.
2021, does for vision models): an update with ΔW x = 0 for those inputs x leaves the matrix's
output on that task unchanged. The right-side protected basis of the next job is then
[V_k | memory directions], orthonormalised, and the invariant ΔW = (I − U_kU_kᵀ) ΔW (I − V_kV_kᵀ)
still holds.

The memory is a factor F (in × r, orthogonal columns sorted by norm) with F Fᵀ ≈ Σ_t C_t / tr C_t:
each learned task t adds the fewest top eigenvectors of its input covariance C_t that hold
`memory_energy` of its energy, weighted by their share of it, so every task weighs the same and a
direction several tasks use weighs more. A job protects, beyond V_k (protected anyway), the memory's
strongest directions outside V_k, at most `memory_share` of the directions the top-k rule leaves
trainable, so every new task keeps room to learn. On SmolLM2 after the 4 tasks of bench-forgetting,
that cap (~66 of a 576-wide input's ~133 trainable directions) holds 99.7–100 % of the memory's
energy outside V_k. Protecting only the directions that hold 97 % of it (27–37) gave the next tasks
more room but lost task 1: it forgot more (BWT −6.3 vs −2.1) and learned no better on average.
History: a first version capped the memory at half the input dimension, which covered the whole
trainable complement of the 576-wide inputs (the third and fourth tasks of bench-forgetting learned
19 % and 0 %); a second protected the oldest tasks' directions first, up to the cap.
"""

from __future__ import annotations

import torch

from worker.training.device import to_device

# Directions whose energy is below this share of the memory's total are numerical dust.
NEGLIGIBLE_ENERGY = 1e-6


@torch.no_grad()
def input_covariances(
    model: torch.nn.Module, targets: dict[str, torch.nn.Linear], batches: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Σ xxᵀ over the batches' non-padding tokens, at the input of every target matrix (fp32, in × in)."""
    covariances = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                   for name, m in targets.items()}
    mask: torch.Tensor | None = None

    def hook(name: str):
        def record(_module, args):
            x = args[0][mask].float()
            covariances[name].addmm_(x.T, x)
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in targets.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = to_device(batch, device)
            mask = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return covariances


def grow_memory(memory: torch.Tensor | None, covariance: torch.Tensor, energy: float) -> torch.Tensor:
    """The parent's memory factor plus the new task's top directions (up to `energy` of its inputs)."""
    total = float(covariance.trace())
    if total <= 0 or energy <= 0:
        return memory if memory is not None else covariance.new_zeros(covariance.shape[0], 0)
    values, vectors = torch.linalg.eigh(covariance)
    shares = values.flip(0).clamp(min=0) / total
    count = min(int((shares.cumsum(0) < energy).sum()) + 1, shares.numel())
    task = vectors.flip(1)[:, :count] * shares[:count].sqrt()
    return _compress(task if memory is None else torch.cat([memory, task], dim=1))


def protected_directions(memory: torch.Tensor, protected: torch.Tensor, limit: int) -> torch.Tensor:
    """Orthonormal basis of the memory's `limit` strongest directions outside span(protected)
    (orthonormal columns)."""
    outside = memory - protected @ (protected.T @ memory)
    outside = outside - protected @ (protected.T @ outside)  # twice: Gram-Schmidt re-orthogonalisation
    directions, _ = _principal_directions(outside)
    return directions[:, :limit]


def _compress(factor: torch.Tensor) -> torch.Tensor:
    """Orthogonal columns with the same F Fᵀ, by decreasing norm, dust dropped."""
    directions, norms = _principal_directions(factor)
    return directions * norms


def _principal_directions(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal directions of span(factor) by decreasing energy, and the norm of factor along each;
    dust dropped."""
    if factor.shape[1] == 0:
        return factor, factor.new_zeros(0)
    left, singular, _ = torch.linalg.svd(factor, full_matrices=False)
    keep = singular.square() > NEGLIGIBLE_ENERGY * float(singular.square().sum())
    return left[:, keep], singular[keep]
