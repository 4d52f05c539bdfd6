"""Micro-batches (SCULPTOR_TRAIN_MICRO_BATCH): the same update as the whole batch, with one projection per batch."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sculptor.datasets import Hyperparameters
from worker import osft
from worker.training.data import make_batches, tokenize_chat
from worker.training.loop import AllParameters, micro_batches, train


def _batches(tokenizer, count=12, batch_size=6):
    examples = [tokenize_chat(tokenizer, [{"role": "user", "content": f"question {i} " * (1 + i % 3)},
                                          {"role": "assistant", "content": f"answer {i}" * (1 + i % 2)}], 48)
                for i in range(count)]
    return make_batches(examples, batch_size, 1, tokenizer.pad_token_id, seed=0)


def _trained(model_dir, constraint_for, micro_batch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = _batches(tokenizer)
    constraint = constraint_for(model, batches)
    steps = []
    optimizer_of = constraint.make_optimizer

    def counting_optimizer(*args, **kwargs):  # counts the updates, i.e. the projections
        optimizer = optimizer_of(*args, **kwargs)
        step = optimizer.step
        optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
        return optimizer
    constraint.make_optimizer = counting_optimizer
    result = train(model, batches, constraint, 1e-3, steps_per_epoch=len(batches), bf16_autocast=False,
                   micro_batch=micro_batch)
    return model, result, len(steps), len(batches)


def test_micro_batches_weigh_each_part_by_its_learned_tokens(tiny_model_dir):
    batch = _batches(AutoTokenizer.from_pretrained(tiny_model_dir))[0]
    parts = list(micro_batches(batch, 4))
    assert [p["input_ids"].shape[0] for p, _ in parts] == [4, 2]
    assert abs(sum(w for _, w in parts) - 1.0) < 1e-9
    assert [w for _, w in micro_batches(batch, None)] == [1.0]


def test_micro_batches_give_the_whole_batchs_update(tiny_model_dir):
    whole, whole_result, _, _ = _trained(tiny_model_dir, lambda m, b: AllParameters(m), None)
    parts, parts_result, _, _ = _trained(tiny_model_dir, lambda m, b: AllParameters(m), 2)
    assert abs(whole_result.final_loss - parts_result.final_loss) < 1e-4
    for a, b in zip(whole.parameters(), parts.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_a_constrained_job_projects_once_per_batch_not_per_micro_batch(tiny_model_dir):
    def constraint(model, batches):
        return osft.build_constraint(model, Hyperparameters(), "v0", None, batches[:1])
    whole, _, whole_steps, batches = _trained(tiny_model_dir, constraint, None)
    parts, _, part_steps, _ = _trained(tiny_model_dir, constraint, 1)
    assert whole_steps == part_steps == batches  # 2 updates, though the second run did 12 backward passes
    for a, b in zip(whole.parameters(), parts.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
