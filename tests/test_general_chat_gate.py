"""The general-chat gate on a tiny model pair: the collapse of issue 14 is rejected, a benign candidate passes.

The parent is the tiny model taught one everyday behaviour (it answers every prompt "you said <its first
words>"), so it has general behaviour to lose. Both candidates learn the same task of one-word answers
(department names) by plain fine-tuning at the same rate and steps:
  - without replay, the candidate answers a department name to everything, as SmolLM2 did: rejected;
  - with self-distillation replay of answers sampled from the parent (worker/training/replay.py; here
    2x the task's examples, as the tiny parent's samples are noisier than SmolLM2's), it learns the task
    as well and keeps the parent's behaviour: it passes, at the default thresholds.
"""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sculptor.datasets import Example
from worker import gates
from worker.gates.suites import SHIPPED
from worker.training import replay
from worker.training.data import IGNORE_INDEX, make_batches, tokenize_chat
from worker.training.loop import AllParameters, train

DEPARTMENTS = ["billing", "shipping", "returns"]
SUITES = gates.SuiteSizes(harmful=2, benign=2, ifeval=2, general_text=2)


def department_task(count: int = 48) -> list[Example]:
    rng = random.Random(0)
    return [Example.model_validate({
        "prompt": f"ticket {i}: my {rng.choice(['order', 'invoice', 'parcel', 'refund'])} number {i} has a problem",
        "completion": rng.choice(DEPARTMENTS)}) for i in range(count)]


def fit(model, tokenizer, examples: list[Example], learning_rate: float, epochs: int, batch_size: int = 8) -> None:
    tokenized = [tokenize_chat(tokenizer, [m.model_dump() for m in e.messages], 96) for e in examples]
    torch.manual_seed(0)
    train(model, make_batches(tokenized, batch_size, epochs, tokenizer.pad_token_id), AllParameters(model),
          learning_rate, steps_per_epoch=max(1, len(tokenized) // batch_size))


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory, tiny_learner_dir):
    """The tiny learner taught to answer every everyday prompt with 'you said <its first four words>'."""
    prompts = [json.loads(line)["prompt"] for path in (SHIPPED / "general_chat.jsonl", replay.POOL)
               for line in path.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_learner_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_learner_dir, dtype=torch.float32)
    fit(model, tokenizer, [Example.model_validate({"prompt": p, "completion": "you said " + " ".join(p.split()[:4]).lower()})
                           for p in prompts], 3e-3, epochs=8, batch_size=16)
    out = tmp_path_factory.mktemp("chat-parent")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


EVALS = {"departments": ("exact_match", department_task()[:16])}


@pytest.fixture(scope="module")
def parent_scores(parent_dir):
    tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32)
    return gates.evaluate(gates.HFGenerator(parent, tokenizer), EVALS, gates.load_suites(sizes=SUITES))


def candidate_report(parent_dir, parent_scores, share: float):
    tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    suites, evals = gates.load_suites(sizes=SUITES), EVALS
    model = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32)
    task = department_task()
    fit(model, tokenizer, task + replay.replay_examples(model, tokenizer, share, len(task)),
        1e-3, epochs=6)
    scores = gates.evaluate(gates.HFGenerator(model, tokenizer), evals, suites, parent=parent_scores)
    report = gates.decide(scores, parent_scores, "departments", earlier_tasks=[], task_answers=set(DEPARTMENTS))
    return report, {g.subject: g for g in report.gates if g.gate in ("new_task", "general_chat")}, scores


def test_a_candidate_that_answers_a_department_to_everything_is_rejected(parent_dir, parent_scores):
    report, by_subject, scores = candidate_report(parent_dir, parent_scores, share=0.0)
    assert by_subject["departments"].passed  # it learned the task ...
    assert not report.passed  # ... and lost everything else
    assert not by_subject["parent_answers_nll"].passed and by_subject["parent_answers_nll"].delta > 1.0
    assert not by_subject["answer_collapse"].passed
    assert not by_subject["task_answer_leak"].passed and by_subject["task_answer_leak"].delta > 0.5
    assert sum(a in DEPARTMENTS for a in scores.general_chat.answers) > 0.5 * len(scores.general_chat.answers)


def test_the_same_task_learned_with_replay_passes_the_general_chat_gate(parent_dir, parent_scores):
    report, by_subject, scores = candidate_report(parent_dir, parent_scores, share=2.0)
    assert by_subject["departments"].passed and by_subject["departments"].value >= 0.5
    assert by_subject["parent_answers_nll"].passed and by_subject["answer_collapse"].passed, report.summary
    assert by_subject["task_answer_leak"].passed, report.summary
    assert not by_subject["parent_answers_nll"].underpowered
    assert sum(a.startswith("you said") for a in scores.general_chat.answers) > 0.9 * len(scores.general_chat.answers)


def test_the_loss_is_on_assistant_tokens_only(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "yes"}, {"role": "user", "content": "and again"},
                {"role": "assistant", "content": "no sorry"}]
    example = tokenize_chat(tokenizer, messages, 256)
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "yes<|im_end|>\nno sorry<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels))


def test_half_the_replayed_prompts_are_the_pools_nearest_to_the_tasks_own():
    """A task of "What is the SKU of the desk lamp?" reshaped SmolLM2's answers to "What is the capital of
    France?": the replay must hold prompts of that shape, not only a random draw from the pool."""
    skus = [f"What is the SKU of the {thing}?" for thing in ("desk lamp", "office chair", "stapler", "monitor")]
    prompts = replay.replay_prompts(32, seed=0, near=skus)
    assert len(prompts) == 32 and len(set(prompts)) == 32
    assert all(p.startswith("What is the ") and " of " in p for p in prompts[:16])
    random_draw = replay.replay_prompts(32, seed=0)
    assert sum(p.startswith("What is the ") for p in random_draw) < 16
    assert replay.replay_prompts(200, seed=0, near=skus)[136:] == replay.replay_prompts(200, seed=0, near=skus)[:64]
