"""Task memory (worker/osft/memory.py): what it stores per task and which directions a job protects."""

import torch

from worker.osft.memory import grow_memory, protected_directions
from worker.osft.projector import Projector
from worker.osft.subspace import compute_bases


def covariance_along(directions: torch.Tensor, energies: list[float]) -> torch.Tensor:
    return directions @ torch.diag(torch.tensor(energies)) @ directions.T


def test_every_task_weighs_the_same_and_shared_directions_add_up():
    axes = torch.eye(8)
    first = covariance_along(axes[:, [0, 1]], [900.0, 100.0])   # task 1: loud inputs
    second = covariance_along(axes[:, [1, 2]], [0.6, 0.4])       # task 2: quiet inputs, one shared axis
    memory = grow_memory(grow_memory(None, first, energy=1.0), second, energy=1.0)

    weights = (memory @ memory.T).diagonal()
    # Each task is normalised to its own energy: axis 1 carries 0.1 from task 1 and 0.6 from task 2.
    assert torch.allclose(weights, torch.tensor([0.9, 0.7, 0.4, 0, 0, 0, 0, 0]), atol=1e-5)
    norms = memory.norm(dim=0)
    assert torch.all(norms[:-1] >= norms[1:]), "columns are sorted by energy"
    assert torch.allclose(memory.T @ memory, torch.diag(norms.square()), atol=1e-5), "columns are orthogonal"


def test_energy_threshold_keeps_the_fewest_top_directions():
    covariance = covariance_along(torch.eye(6)[:, :4], [50.0, 30.0, 15.0, 5.0])
    assert grow_memory(None, covariance, energy=0.8).shape[1] == 2
    assert grow_memory(None, covariance, energy=0.81).shape[1] == 3


def test_a_job_protects_the_strongest_memory_directions_outside_the_top_k():
    axes = torch.eye(8)
    memory = axes[:, [0, 1, 2]] * torch.tensor([3.0, 2.0, 1.0]).sqrt()
    chosen = protected_directions(memory, protected=axes[:, [0]], limit=1)
    # Axis 0 is protected by the top k already; of the rest, axis 1 has the most energy.
    assert chosen.shape == (8, 1) and torch.allclose(chosen.abs().squeeze(), axes[:, 1])


def test_projected_update_is_zero_on_the_protected_memory():
    torch.manual_seed(0)
    parent = torch.randn(24, 16)
    memory = torch.linalg.qr(torch.randn(16, 5)).Q * 0.5
    projector = Projector(parent, compute_bases(parent), k=6, memory=memory, memory_share=1.0)
    assert projector.memory_rank == 5

    weight = parent + torch.randn_like(parent)
    projector.project_(weight, parent)
    delta = weight - parent
    assert (delta @ memory).norm() <= 1e-5 * delta.norm()
    assert (delta @ compute_bases(parent).Vh[:6].T).norm() <= 1e-5 * delta.norm()
