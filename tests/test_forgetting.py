"""Two synthetic tasks in sequence on a tiny model: the constrained method forgets the first much less.

Both runs go through the real registry (Redis + object store): task 1's version is recorded with its
bases and task memory, and task 2's job loads them. The tiny model has only 128 dimensions per
matrix, so the protected ratio is 0.5 and the memory energy 0.9 (the defaults, 0.75 and 0.97, are
sized for real models and leave a 128-dimensional matrix almost no room to learn task 2).
"""

import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sculptor.datasets import Hyperparameters
from sculptor.storage import ObjectStore
from worker.osft import SubspaceRegistry, build_constraint, record_version
from worker.training.data import collate, make_batches, tokenize_chat
from worker.training.loop import train

KEYS = "ruby jade onyx opal pearl amber coral ivory topaz agate beryl flint slate chalk cobalt copper".split()
ANSWERS = "alpha bravo delta echo golf hotel india kilo lima mike oscar papa romeo sierra tango".split()
CONSTRAINED = Hyperparameters(method="osft", mean_protected_ratio=0.5, memory_energy=0.9)
PLAIN = Hyperparameters(method="full")


def task(template: str, keys: list[str], seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": template.format(key)}, {"role": "assistant", "content": rng.choice(ANSWERS)}]
            for key in keys]


FIRST = task("code for {}?", KEYS[:8], seed=1)
SECOND = task("what colour is the {} stone", KEYS[8:], seed=2)


def answer_loss(model, tokenizer, examples) -> float:
    batch = collate([tokenize_chat(tokenizer, e, 64) for e in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def learn(model, tokenizer, examples, hp, parent, version, registry, learning_rate, seed):
    batches = make_batches([tokenize_chat(tokenizer, e, 64) for e in examples], 4, 15, tokenizer.pad_token_id,
                           seed=seed)
    constraint = build_constraint(model, hp, parent, registry, batches[:2])
    torch.manual_seed(0)
    train(model, batches, constraint, learning_rate, steps_per_epoch=2)
    record_version(registry, model, version, parent, version, constraint, memory_batches=batches[:2])
    return constraint


def forgetting_and_learning(tiny_learner_dir, registry, hp, learning_rate, name):
    """(rise of task 1's answer loss while learning task 2, task 2's loss before, after); and the constraint."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_learner_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_learner_dir, dtype=torch.float32)
    learn(model, tokenizer, FIRST, hp, "base", f"{name}-1", registry, learning_rate, seed=0)
    first_before = answer_loss(model, tokenizer, FIRST)
    second_before = answer_loss(model, tokenizer, SECOND)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    constraint = learn(model, tokenizer, SECOND, hp, f"{name}-1", f"{name}-2", registry, learning_rate, seed=1)
    rise = answer_loss(model, tokenizer, FIRST) - first_before
    return rise, second_before, answer_loss(model, tokenizer, SECOND), constraint, before, model


def test_constrained_run_forgets_the_first_task_less_and_still_learns_the_second(
        tiny_learner_dir, redis_client, tmp_path):
    registry = SubspaceRegistry(redis_client, ObjectStore((tmp_path / "store").as_uri()))
    plain_rise, _, plain_after, _, _, _ = forgetting_and_learning(tiny_learner_dir, registry, PLAIN, 3e-3, "full")
    rise, second_before, second_after, constraint, before, model = forgetting_and_learning(
        tiny_learner_dir, registry, CONSTRAINED, 1e-2, "osft")

    assert plain_rise > 0.5, f"the plain run should visibly forget task 1 (loss rise {plain_rise:.3f})"
    assert rise < 0.5 * plain_rise, f"constrained loss rise {rise:.3f} vs plain {plain_rise:.3f}"
    assert second_after < 0.5 * second_before, f"task 2 not learned: {second_before:.3f} -> {second_after:.3f}"

    # The memory of task 1 is part of the constraint: task 2's update is zero on task 1's input directions.
    parent_memory = registry.load_memory("osft-1", list(constraint.targets))
    for name, module in constraint.targets.items():
        memory = parent_memory.get(name)
        assert memory is not None and memory.shape[1] > 0
        assert constraint.plans[name].memory_rank > 0
        delta = module.weight.detach() - before[f"{name}.weight"]
        assert (delta @ memory).norm() <= 1e-4 * delta.norm(), f"{name} moved on task 1's inputs"
    record = registry.get("osft-2")
    assert all(m.memory_directions >= constraint.plans[n].memory_rank for n, m in record.matrices.items())
