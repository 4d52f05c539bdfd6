"""Automatic hyperparameters (worker/training/auto.py): steps by rule, learning rate by a validation probe."""

import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.training import auto
from worker.training.data import make_batches, tokenize_chat
from worker.training.loop import AllParameters
from worker.training.loop import train as train_loop


def test_epochs_give_every_task_enough_steps():
    assert auto.choose_epochs(16, 8, default_epochs=2) == 16  # 2 steps an epoch: 32 steps
    assert auto.choose_epochs(216, 8, default_epochs=2) == 2  # 27 steps an epoch: the default's 54 suffice
    assert auto.choose_epochs(1, 8, default_epochs=2) == auto.MAX_EPOCHS


def test_validation_split_is_held_out_and_bounded():
    items = list(range(240))
    train, validation = auto.validation_split(items, seed=0)
    assert len(validation) == 24 and not set(train) & set(validation) and len(train) + 24 == 240
    assert auto.validation_split(items, seed=0) == (train, validation)  # seeded
    assert len(auto.validation_split(list(range(16)), 0)[1]) == 4
    assert len(auto.validation_split(list(range(1000)), 0)[1]) == auto.MAX_VALIDATION
    assert auto.validation_split([1, 2, 3], 0)[1] == []  # too few to hold any out


def test_probe_picks_the_rate_that_learns_and_puts_the_weights_back(tiny_learner_dir, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_learner_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_learner_dir, dtype=torch.float32)
    rng = random.Random(0)
    answers = ["alpha", "bravo", "delta"]
    examples = [tokenize_chat(tokenizer, [{"role": "user", "content": f"code {i}"},
                                          {"role": "assistant", "content": rng.choice(answers)}], 32) for i in range(40)]
    train, validation = auto.validation_split(examples, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setitem(auto.LEARNING_RATES, "full", (1e-9, 3e-3))  # one rate that cannot learn in 8 steps
    rate, losses = auto.probe_learning_rate(model, AllParameters(model), train, validation, "full", 8,
                                            tokenizer.pad_token_id, bf16_autocast=False)
    assert rate == 3e-3 and losses["0.003"] < losses["1e-09"] <= losses["start"] + 1e-6
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_gentlest_rate_that_makes_most_of_the_progress_wins():
    # The department task on SmolLM2 (bench_general_chat): 3e-4 already made most of the drop.
    assert auto.pick_rate(8.0, {"0.0003": 2.49, "0.001": 1.66, "0.003": 1.31}) == 3e-4
    # bench-forgetting's invented-3 in the stream: 3e-4 made 37 % of the drop, and the rounds finish the rest.
    assert auto.pick_rate(6.55, {"0.0003": 5.37, "0.001": 4.31, "0.003": 3.36}) == 3e-4
    # A task the gentle rate barely starts on gets a larger one.
    assert auto.pick_rate(8.0, {"0.0003": 7.5, "0.001": 6.5, "0.003": 1.0}) == 3e-3
    assert auto.pick_rate(8.0, {"0.0003": 7.5, "0.001": 2.0, "0.003": 1.0}) == 1e-3
    assert auto.pick_rate(8.0, {"0.0003": 8.0, "0.001": float("inf")}) == 3e-4  # a diverged probe never wins


def test_training_goes_on_while_the_task_is_not_reproduced_and_a_round_still_helps():
    def run(shares, losses=None, room=99):
        losses = losses or [1.0] * len(shares)  # the answer loss after each round
        trained = []

        def train_round(i):
            if i > room:
                return False
            trained.append(i)
            return True
        result = auto.rounds_until_learned(train_round, lambda: (shares[len(trained)], losses[len(trained)]))
        return result, trained

    assert run([0.62, 0.9, 1.0]) == ([0.62, 0.9, 1.0], [1, 2])  # learned in the third round
    assert run([0.62, 1.0, 1.0]) == ([0.62, 1.0], [1])  # learned after the second: no third
    assert run([1.0]) == ([1.0], [])  # learned in the planned round: nothing more
    assert run([0.5, 0.5, 0.9]) == ([0.5, 0.5], [1])  # a round that did not help ends it
    # 4-digit codes (make run's SKU task): no answer right yet after two rounds, but the loss keeps falling.
    assert run([0.0, 0.0, 0.5, 1.0], losses=[1.7, 0.44, 0.1, 0.01]) == ([0.0, 0.0, 0.5, 1.0], [1, 2, 3])
    assert run([0.0, 0.0, 0.5], losses=[1.7, 1.6, 0.1])[0] == [0.0, 0.0]  # a loss that barely moved did not help
    assert run([0.1, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9])[0] == [0.1, 0.2, 0.4, 0.6, 0.7, 0.8]  # at most MAX_ROUNDS (6)
    assert run([0.5, 0.9], room=0) == ([0.5], [])  # no budget left for another round


def test_reproduced_share_counts_examples_whose_every_answer_token_is_predicted(tiny_learner_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_learner_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_learner_dir, dtype=torch.float32)
    examples = [tokenize_chat(tokenizer, [{"role": "user", "content": f"code {i}"},
                                          {"role": "assistant", "content": "alpha"}], 32) for i in range(8)]
    before = auto.reproduced_share(model, examples, tokenizer.pad_token_id)
    train_loop(model, make_batches(examples, 8, 40, tokenizer.pad_token_id), AllParameters(model), 3e-3,
               steps_per_epoch=1, bf16_autocast=False)
    assert before == 0.0 and auto.reproduced_share(model, examples, tokenizer.pad_token_id) == 1.0
