"""The SVD constraint holds after real AdamW steps; everything outside the targets stays bit-identical."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sculptor.datasets import Hyperparameters
from worker.osft import CapacityExhausted, OSFTConfig, build_constraint
from worker.osft.constraint import plan_matrices
from worker.osft.subspace import compute_bases
from worker.training.data import make_batches, tokenize_chat
from worker.training.loop import train

WORDS = "model learns new tasks without forgetting old ones answer question reverse copy".split()


def chat_batches(model_dir, epochs: int = 2, batch_size: int = 4):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [[{"role": "user", "content": f"copy {w}"}, {"role": "assistant", "content": f"{w} {w} {w}"}]
                for w in WORDS]
    tokenized = [tokenize_chat(tokenizer, messages, 64) for messages in examples]
    return make_batches(tokenized, batch_size, epochs, tokenizer.pad_token_id)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_update_stays_orthogonal_to_protected_directions(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batches = chat_batches(tiny_model_dir)
    before = snapshot(model)
    constraint = build_constraint(model, Hyperparameters(method="osft"), "base", None, batches[:2])
    train(model, batches, constraint, learning_rate=1e-2, steps_per_epoch=len(batches) // 2)

    report = constraint.report()
    assert report["method"] == "osft" and report["registry_hit"] is False and report["svd_s"] >= 0
    targets = {f"{name}.weight": plan for name, plan in report["matrices"].items()}
    assert len(targets) == 2 * 7
    for name, p in model.named_parameters():
        if name not in targets:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"
            continue
        k = targets[name]["k"]
        assert 0.5 * 128 <= k <= 0.95 * 128
        parent = compute_bases(before[name])  # recomputed here, independent of the constraint's copy
        U, Vh = parent.U, parent.Vh
        delta = p.detach() - before[name]
        size = delta.norm()
        assert size > 1e-3 * before[name].norm(), f"{name} did not train"
        assert (U[:, :k].T @ delta).norm() <= 1e-4 * size, f"{name} moved in a protected left direction"
        assert (delta @ Vh[:k].T).norm() <= 1e-4 * size, f"{name} moved in a protected right direction"


def test_a_job_with_every_matrix_spent_fails_with_capacity_exhausted(tiny_model_dir):
    # Formerly the constraint came back with no trainable parameter and the optimizer raised torch's
    # "empty parameter list"; now the plan is refused before any SVD, naming the matrices.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batches = chat_batches(tiny_model_dir, epochs=1)
    before = snapshot(model)
    config = OSFTConfig(mean_protected_ratio=0.99, min_protected_ratio=0.99, max_protected_ratio=0.99)
    with pytest.raises(CapacityExhausted) as raised:
        build_constraint(model, Hyperparameters(), "base", None, batches[:1], config=config)
    assert raised.value.code == "capacity_exhausted" and len(raised.value.spent) == 14
    message = str(raised.value)
    assert "all 14 target matrices are spent" in message and "model.layers.0.self_attn.q_proj" in message
    assert "and 11 more" in message and "protected ratios" in message and "activate" in message
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_full_fine_tuning_trains_the_same_matrices_without_projection(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batches = chat_batches(tiny_model_dir, epochs=1)
    before = snapshot(model)
    constraint = build_constraint(model, Hyperparameters(method="full"), "base", None, batches)
    train(model, batches, constraint, learning_rate=1e-2, steps_per_epoch=len(batches))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"{name}.weight" for name in constraint.targets}
    assert constraint.report()["method"] == "full"


def test_protection_grows_with_tasks_and_never_shrinks_without_the_memory():
    # The old schedule, unbounded; with the task memory on (the default) growth stops at max_grown_ratio
    # (tests/test_capacity.py), so this runs with the memory off.
    config = OSFTConfig(task_memory=False)
    shapes = {"model.layers.0.mlp.up_proj": (256, 128), "model.layers.1.mlp.up_proj": (256, 128)}
    importance = {0: 0.9, 1: 0.3}
    first = plan_matrices(shapes, importance, None, config)
    ratios = [plan.protected_ratio for plan in first.values()]
    assert ratios[0] > 0.75 > ratios[1] >= 0.5  # the layer that changes its input less is protected more
    assert first == plan_matrices(shapes, importance, None, OSFTConfig())  # the first task: the same either way
    record = {"tasks": ["t1"], "matrices": {name: {"k": plan.k} for name, plan in first.items()}}
    second = plan_matrices(shapes, {0: 0.3, 1: 0.9}, record, config)  # importance flips
    for name in shapes:
        assert second[name].k >= first[name].k
    uniform = plan_matrices(shapes, importance, None, OSFTConfig(adaptive_ranks=False))
    assert {plan.k for plan in uniform.values()} == {96}
    grown = plan_matrices(shapes, {}, {"tasks": ["t1", "t2"], "matrices": {}}, OSFTConfig(adaptive_ranks=False))
    assert all(plan.k == round((1 - 0.25 * 0.85**2) * 128) for plan in grown.values())


@pytest.mark.parametrize("bad", [dict(mean_protected_ratio=0.4), dict(remainder_decay=0.0), dict(max_grown_ratio=0.0)])
def test_config_refuses_inconsistent_ratios(bad):
    with pytest.raises(ValueError):
        OSFTConfig(**bad)


@pytest.mark.parametrize("shape,k", [((48, 32), 24), ((32, 48), 24), ((40, 40), 30), ((48, 32), 8)])
def test_projector_branches_keep_protected_directions(shape, k):
    """Complement on the right, on the left, on both (square), and protected bases on both sides."""
    from worker.osft.projector import Projector

    torch.manual_seed(0)
    parent = torch.randn(shape)
    weight = parent.clone()
    projector = Projector(weight, compute_bases(parent), k)
    weight += 0.1 * torch.randn(shape)
    projector.project_(weight, reference=parent)
    U, _, Vh = torch.linalg.svd(parent, full_matrices=False)
    delta = weight - parent
    assert delta.norm() > 0.01
    assert (U[:, :k].T @ delta).norm() <= 1e-5 * delta.norm()
    assert (delta @ Vh[:k].T).norm() <= 1e-5 * delta.norm()
    again = weight.clone()
    projector.project_(again, reference=parent)
    assert torch.allclose(again, weight, atol=1e-6)  # a projection: applying it twice changes nothing
