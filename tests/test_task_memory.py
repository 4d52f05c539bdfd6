"""Task memory (worker/osft/memory.py): what it stores per task and which directions a job protects."""

import torch

from worker.osft.memory import grow_memory, protected_directions
from worker.osft.projector import Projector
from worker.osft.subspace import compute_bases
from tests.test_pipeline import ctx  # noqa: F401  (the in-process job fixture)


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


def everyday_batches(model_dir):
    from transformers import AutoTokenizer

    from worker.training.data import make_batches, tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chats = [[{"role": "user", "content": f"tell me about the {w}"}, {"role": "assistant", "content": f"the {w} is nice"}]
             for w in ("sea", "sun", "moon", "tree", "city", "road", "bird", "rain")]
    return make_batches([tokenize_chat(tokenizer, c, 64) for c in chats], 4, 1, tokenizer.pad_token_id)


def test_a_chat_seeded_memory_protects_everyday_inputs_once_per_lineage(tiny_model_dir, redis_client, tmp_path):
    from transformers import AutoModelForCausalLM

    from sculptor.datasets import Hyperparameters
    from sculptor.storage import ObjectStore
    from tests.test_osft_invariant import chat_batches
    from worker.osft import SubspaceRegistry, build_constraint, record_version

    registry = SubspaceRegistry(redis_client, ObjectStore(tmp_path.as_uri()))
    task, chat = chat_batches(tiny_model_dir, epochs=1), everyday_batches(tiny_model_dir)
    seeded = Hyperparameters(general_chat_memory=True)
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # noqa: E731

    plain = build_constraint(load(), Hyperparameters(), "base", registry, task[:1], chat_batches=chat)
    assert not plain.general_chat_memory and not any(p.memory_rank for p in plain.plans.values())

    model = load()
    first = build_constraint(model, seeded, "base", registry, task[:1], chat_batches=chat)
    assert first.general_chat_memory and first.report()["general_chat_memory"]
    assert all(p.memory_rank > 0 for p in first.plans.values() if not p.spent)  # protected from the first job on
    record = record_version(registry, model, "v1", "base", "task-1", first, memory_batches=task)
    assert record.general_chat_memory

    # The next job inherits the chat directions with the memory and does not add them a second time.
    stored = registry.load_memory("v1", list(first.targets))
    second = build_constraint(load(), seeded, "v1", registry, task[:1], chat_batches=chat)
    assert second.general_chat_memory
    for name, memory in second.memory.items():
        assert torch.equal(memory, stored[name])


def test_a_job_seeds_the_memory_with_the_parents_everyday_answers(ctx):
    from tests.test_pipeline import examples, submit
    from worker import osft, pipeline

    _, job = submit(ctx, "greet", examples("say the greeting", "hello world", n=16), epochs=2,
                    general_replay=0.0, general_chat_memory=True)
    done = pipeline.run_job(ctx, job.job_id)
    assert done.training and done.training.replayed_examples == 0  # sampled for the memory only
    assert done.training.constraint.general_chat_memory
    record = osft.SubspaceRegistry(ctx.redis, ctx.store).get(done.candidate_version)
    assert record.general_chat_memory and all(
        m.memory_directions > 0 for m in record.matrices.values() if not m.spent)
