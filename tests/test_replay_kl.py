"""The KL term to the parent on replayed everyday answers (general_replay_kl).

  - the loss it trains on is the token cross-entropy where a row has no parent distribution, and the
    cross-entropy to the parent's distribution where it has one (loop.py: batch_loss);
  - the distribution is the parent's own: its greedy token first, k tokens with the parent's probabilities
    (the rest of the mass is "every other token", which the loss keeps, so the model is not sharpened);
  - a job with it on learns the replayed answers that way and says so in its report.
"""

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from sculptor.datasets import Hyperparameters
from tests.test_pipeline import ctx, examples, submit  # noqa: F401  (ctx: the in-process job fixture)
from worker import pipeline
from worker.training import replay
from worker.training.data import IGNORE_INDEX, ParentDistribution, TokenizedExample, collate, tokenize_chat
from worker.training.loop import batch_loss


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def chats(tokenizer, *pairs) -> list[TokenizedExample]:
    return [tokenize_chat(tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": a}], 64)
            for p, a in pairs]


def one_hot(example: TokenizedExample, k: int = 4) -> TokenizedExample:
    """The example with a 'parent distribution' that is all on its own next tokens."""
    positions = [p for p in range(1, len(example.labels)) if example.labels[p] != IGNORE_INDEX]
    ids = torch.zeros((len(positions), k), dtype=torch.long)
    probs = torch.zeros((len(positions), k))
    ids[:, 0], probs[:, 0] = torch.tensor([example.labels[p] for p in positions]), 1.0
    return TokenizedExample(example.input_ids, example.labels, example.truncated, ParentDistribution(positions, ids, probs))


def test_one_hot_targets_give_exactly_the_token_cross_entropy(tiny):
    model, tokenizer = tiny
    plain = chats(tokenizer, ("what colour is grass?", "green, mostly"), ("say hi", "hello there, friend"))
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        expected = batch_loss(model, collate(plain, pad))  # transformers' own loss: no soft targets here
        mixed = collate([one_hot(plain[0]), plain[1]], pad)  # one soft row, one hard row
        assert "target_ids" in mixed
        assert torch.allclose(batch_loss(model, mixed), expected, atol=1e-5)


def test_the_parent_distribution_is_the_parents_own(tiny):
    model, tokenizer = tiny
    [example] = replay.with_parent_distribution(model, chats(tokenizer, ("what colour is grass?", "green, mostly")),
                                                tokenizer.pad_token_id, k=8)
    learned = [p for p in range(1, len(example.labels)) if example.labels[p] != IGNORE_INDEX]
    assert example.parent.positions == learned
    assert example.parent.token_ids.shape == (len(learned), 8)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0]
    parent = logits[torch.tensor(learned) - 1].softmax(-1)
    assert torch.equal(example.parent.token_ids[:, 0], parent.argmax(-1))
    assert torch.allclose(example.parent.probs, parent.gather(-1, example.parent.token_ids), atol=1e-6)
    assert (example.parent.probs.sum(-1) < 1).all()  # the tiny model spreads its mass: the rest is kept apart
    # And it is a distribution, not the answer's tokens: the loss to it differs from the answer's cross-entropy.
    with torch.no_grad():
        soft = batch_loss(model, collate([example], tokenizer.pad_token_id))
        hard = batch_loss(model, collate([TokenizedExample(example.input_ids, example.labels)], tokenizer.pad_token_id))
    assert not torch.isclose(soft, hard, atol=1e-3)


def test_at_the_parent_the_loss_is_the_entropy_of_its_coarse_distribution(tiny):
    """The KL term is 0 at the parent: the loss there is the entropy of (top k, rest), and any other model
    scores higher. Renormalising the top k instead would reward a model that drops the rest of the vocabulary."""
    model, tokenizer = tiny
    [example] = replay.with_parent_distribution(model, chats(tokenizer, ("say hi", "hello there")),
                                                tokenizer.pad_token_id, k=4)
    probs = example.parent.probs
    rest = 1 - probs.sum(-1)
    entropy = -((probs * probs.log()).sum(-1) + rest * rest.log()).mean()
    with torch.no_grad():
        at_parent = batch_loss(model, collate([example], tokenizer.pad_token_id))
        model.lm_head.weight.mul_(3.0)  # another model: the (tied) head and embeddings scaled
        sharper = batch_loss(model, collate([example], tokenizer.pad_token_id))
        model.lm_head.weight.div_(3.0)
    assert at_parent == pytest.approx(float(entropy), abs=1e-4)
    assert sharper > at_parent + 0.01


def test_training_on_a_distribution_moves_the_model_towards_it(tiny):
    """A row's soft target pulls its predictions towards that distribution: half on the answer's token, half on
    another; after a few steps the model puts more mass on both, and nearer half each."""
    model, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32)
    example = one_hot(chats(tokenizer, ("name a fruit", "apple"))[0])
    example.parent.token_ids[:, 1] = (example.parent.token_ids[:, 0] + 1) % model.config.vocab_size
    example.parent.probs[:, :2] = 0.5
    batch = collate([example], tokenizer.pad_token_id)

    def mass_on_targets() -> torch.Tensor:
        with torch.no_grad():
            probs = model(input_ids=batch["input_ids"]).logits[0, :-1].softmax(-1)
        rows = torch.tensor(example.parent.positions) - 1
        return probs[rows].gather(-1, example.parent.token_ids[:, :2])

    before = mass_on_targets()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(10):
        batch_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = mass_on_targets()
    assert after.sum(-1).mean() > before.sum(-1).mean() + 0.1
    assert (after - 0.5).abs().mean() < (before - 0.5).abs().mean()


def test_a_job_with_the_kl_term_learns_the_replayed_answers_as_the_parents_distribution(ctx):
    _, job = submit(ctx, "kl", examples("say ok", "ok", n=16), epochs=1, general_replay=0.5, general_replay_kl=True)
    done = pipeline.run_job(ctx, job.job_id)
    assert done.training is not None, done.error
    assert done.training.replay_kl and done.training.replayed_examples > 0


def test_the_replay_kl_hyperparameter_is_a_boolean():
    assert Hyperparameters(general_replay_kl=True).general_replay_kl is True
    with pytest.raises(ValidationError):
        Hyperparameters(general_replay_kl="sometimes")
