"""Self-distillation replay: answers sampled from the parent for everyday prompts, mixed into a job's data.

Why: a task whose answers all share one short format (single department names, say) otherwise
teaches the model that every prompt gets such an answer. The subspace constraint keeps the parent's
strongest directions, but not this: after one such task SmolLM2 answered "billing" to "What is the
capital of France?". Training on the parent's own answers to a pool of everyday prompts (a sampled
form of a KL term to the parent on those prompts, with no external data) keeps that behaviour where
the new task does not need to change it. With `general_replay_kl` (on by default; `with_parent_distribution`) each
replayed answer is learned as the parent's whole next-token distribution at every position, not only the
sampled token: the KL term itself on those prompts, one sample's variance the less. The pool (`replay_prompts.jsonl`, 136 prompts, 12 kinds, 48 of them factual questions) is
disjoint from the general-chat gate's suite and from its facts, so the gates still measure held-out prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from sculptor.datasets import Example
from sculptor.scores import bag_of_words, token_f1
from worker.training.data import IGNORE_INDEX, ParentDistribution, TokenizedExample, collate

POOL = Path(__file__).with_name("replay_prompts.jsonl")
ANSWER_MAX_TOKENS = 96  # long enough that most everyday answers end on their own
BATCH = 32
TOP_K = 32  # tokens of the parent's distribution kept apart per position; the rest is one outcome
# Why a floor: share x examples is too few for a small task. A 16-fact task with 8 replayed answers left
# SmolLM2 answering 18-38 of the 244 everyday gate prompts in the task's format or in a few words where it
# used a sentence before ("What is the capital of France?" -> "Loten City"); with 32, 2-3 of them.
MIN_REPLAYED = 32
NEAR_SHARE = 0.5  # of the replayed prompts: the pool's nearest to the task's own (replay_prompts)


def replay_prompts(count: int, seed: int, near: Sequence[str] = (), pool: Path = POOL) -> list[str]:
    """`count` prompts: first the NEAR_SHARE of them most like the task's prompts `near` (by shared words),
    then the rest of the pool in a seeded order, again from the start when more are wanted. Why the nearest:
    a task reshapes most the prompts shaped like its own. After "What is the SKU of the desk lamp?" ->
    "SKU-6305" (48 examples, replaying 32 prompts drawn at random), SmolLM2 answered "What is the capital of
    France?" with "La femme de France, ..." and lost 21 of its 75 facts in the gate's suite."""
    prompts = [json.loads(line)["prompt"] for line in pool.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(prompts)
    if near:
        task = [bag_of_words(p) for p in random.Random(seed).sample(list(near), min(len(near), 64))]
        likeness = {p: max(token_f1(bag_of_words(p), t) for t in task) for p in prompts}
        nearest = sorted(prompts, key=lambda p: -likeness[p])[:round(NEAR_SHARE * min(count, len(prompts)))]
        chosen = set(nearest)
        prompts = nearest + [p for p in prompts if p not in chosen]
    return [prompts[i % len(prompts)] for i in range(count)]


@torch.inference_mode()
def sample_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
    """One answer per prompt, sampled from the model at temperature 1 (no top-k, no top-p)."""
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for start in range(0, len(prompts), BATCH):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts[start:start + BATCH]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            # remove_invalid_values: a parent with non-finite weights still yields (junk) answers here, and the
            # job then fails where it should, at the first non-finite training loss, with that message.
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 remove_invalid_values=True)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def replay_examples(model, tokenizer, share: float, task_examples: int, seed: int = 0,
                    task_prompts: Sequence[str] = ()) -> list[Example]:
    """round(share * task_examples) examples, at least MIN_REPLAYED when share > 0: everyday prompts (half of
    them the nearest to `task_prompts`), each with an answer sampled from the parent (`model`, before any
    training step)."""
    if share <= 0:
        return []
    count = max(round(share * task_examples), MIN_REPLAYED)
    prompts = replay_prompts(count, seed, near=task_prompts)
    answers = sample_answers(model, tokenizer, prompts, ANSWER_MAX_TOKENS, seed)
    return [Example.model_validate({"prompt": p, "completion": a}) for p, a in zip(prompts, answers) if a.strip()]


@torch.no_grad()  # not inference_mode: these tensors are copied into training batches later
def with_parent_distribution(model, tokenized: list[TokenizedExample], pad_id: int, k: int = TOP_K,
                             batch_size: int = 8) -> list[TokenizedExample]:
    """`tokenized` with the parent's (`model`, before any step) top-k next-token probabilities at each learned
    position (the rest of its mass is on every other token), for the training loss to match (loop.py:
    batch_loss)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(tokenized), batch_size):
        chunk = tokenized[start:start + batch_size]
        batch = {key: value.to(device) for key, value in collate(chunk, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        for row, example in enumerate(chunk):
            labels = torch.tensor(example.labels)
            positions = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1) + 1  # logits at p - 1 predict p
            top = logits[row, positions.to(device) - 1].log_softmax(-1).topk(min(k, logits.shape[-1]))
            out.append(TokenizedExample(example.input_ids, example.labels, example.truncated, ParentDistribution(
                positions.tolist(), top.indices.cpu(), top.values.exp().cpu())))
    return out
