"""Work bounds per job (issue 15, item 7): a token budget, a wall-time limit, and batches built lazily."""

import torch

from sculptor.config import Settings
from sculptor.context import Context
from tests.test_pipeline import SMALL_GATES, ctx, examples, submit  # noqa: F401  (ctx: the fixture)
from worker import pipeline
from worker.training.data import TokenizedExample, make_batches


def context(ctx, **settings) -> Context:
    return Context.from_settings(Settings(**{**ctx.settings.model_dump(), **SMALL_GATES, **settings}))


def test_a_job_over_the_token_budget_fails_before_training(ctx):
    bounded = context(ctx, max_training_tokens=500)
    _, job = submit(bounded, "greet", examples("say the greeting", "hello world"))
    done = pipeline.run_job(bounded, job.job_id)
    assert done.status == "failed" and "SCULPTOR_MAX_TRAINING_TOKENS=500" in done.error, done.error
    assert done.progress.step == 0 and bounded.versions.current() == "v0"


def test_a_job_past_its_time_limit_fails_and_keeps_serving(ctx):
    bounded = context(ctx, job_time_limit_s=0.01)
    _, job = submit(bounded, "greet", examples("say the greeting", "hello world"))
    done = pipeline.run_job(bounded, job.job_id)
    assert done.status == "failed" and "SCULPTOR_JOB_TIME_LIMIT_S" in done.error, done.error
    assert bounded.versions.current() == "v0" and done.candidate_version is None


def test_batches_are_collated_only_when_read():
    tokenized = [TokenizedExample([1, 2, 3, 4][: 2 + i % 3], [-100, 5, 6, 7][: 2 + i % 3]) for i in range(1000)]
    batches = make_batches(tokenized, batch_size=8, epochs=50, pad_id=0)
    assert len(batches) == 125 * 50
    held = [v for v in vars(batches).values() if isinstance(v, torch.Tensor)]
    assert not held, "no epoch's tensors are built up front"
    first = batches[0]
    assert first["input_ids"].shape[0] == 8 and (first["labels"] != -100).any()
    assert len(batches[:125]) == 125 and torch.equal(batches[:125][3]["input_ids"], batches[3]["input_ids"])
    assert batches.tokens() == 50 * sum(len(t.input_ids) for t in tokenized)
