"""Self-distillation replay: the parent's own answers to everyday prompts, mixed into a job's data.

Why: a task whose answers all share one short format (single department names, say) otherwise
teaches the model that every prompt gets such an answer. The subspace constraint keeps the parent's
strongest directions, but not this: after one such task SmolLM2 answered "billing" to "What is the
capital of France?". Training on the parent's greedy answers to a pool of everyday prompts (a hard-label
form of a KL term to the parent on those prompts, with no external data) keeps that behaviour where
the new task does not need to change it. The pool (`replay_prompts.jsonl`, 96 prompts, 12 kinds) is
disjoint from the general-chat gate's suite, so the gate still measures held-out prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sculptor.datasets import Example

POOL = Path(__file__).with_name("replay_prompts.jsonl")
ANSWER_MAX_TOKENS = 96  # long enough that most everyday answers end on their own


def replay_prompts(count: int, seed: int, pool: Path = POOL) -> list[str]:
    prompts = [json.loads(line)["prompt"] for line in pool.read_text().splitlines() if line.strip()]
    return random.Random(seed).sample(prompts, min(count, len(prompts)))


def replay_examples(generator, share: float, task_examples: int, seed: int = 0) -> list[Example]:
    """round(share * task_examples) examples (at most the pool's size): each prompt with the parent's answer.

    `generator` is a worker.gates.Generator on the parent (before any training step).
    """
    count = round(share * task_examples)
    if count <= 0:
        return []
    prompts = replay_prompts(count, seed)
    answers = generator.generate([[{"role": "user", "content": p}] for p in prompts], ANSWER_MAX_TOKENS)
    return [Example.model_validate({"prompt": p, "completion": a}) for p, a in zip(prompts, answers) if a.strip()]
