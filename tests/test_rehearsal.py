"""Rehearsal (issue 18, item 4): a job may mix in a share of earlier tasks' own training examples, drawn
equally from the tasks its parent's lineage learned, or from the ones the task names; off by default."""

from tests.test_pipeline import ctx, examples, submit  # noqa: F401  (ctx: the in-process job fixture)
from worker import pipeline
from worker.training import rehearsal


def learn(ctx, name: str, **hyper):
    task, job = submit(ctx, name, examples(f"say {name}", name, n=24), epochs=1, general_replay=0, **hyper)
    done = pipeline.run_job(ctx, job.job_id)
    assert done.status in ("promoted", "rejected"), done.error
    if done.status == "rejected":  # the tiny model may miss a gate; the lineage must still hold the task
        from sculptor import lineage
        done = lineage.force_promote(ctx.versions, ctx.jobs, ctx.store, done)
    return task, done


def test_rehearsal_draws_equally_from_the_lineages_earlier_tasks(ctx):
    first, _ = learn(ctx, "alpha")
    second, _ = learn(ctx, "beta")
    _, off = learn(ctx, "gamma")
    assert off.training.rehearsed_examples == {}  # the default: off
    _, on = learn(ctx, "delta", task_replay=0.5)
    gamma = next(t for t in ctx.tasks.all() if t.name == "gamma")
    # half the task's training examples (the upload less its carved eval split), equally from the three before
    each = round(0.5 * on.training.examples) // 3
    assert each > 0
    assert on.training.rehearsed_examples == {first.task_id: each, second.task_id: each, gamma.task_id: each}


def test_rehearsal_can_name_its_tasks_and_skips_others(ctx):
    first, _ = learn(ctx, "alpha")
    learn(ctx, "beta")
    _, done = learn(ctx, "gamma", task_replay=0.5, task_replay_from=[first.task_id, "task_not_in_lineage"])
    assert done.training.rehearsed_examples == {first.task_id: round(0.5 * done.training.examples)}


def test_drawn_examples_come_from_the_tasks_own_data(ctx):
    first, _ = learn(ctx, "alpha")
    drawn = rehearsal.rehearsal_examples(ctx.store, [first], share=1.0, task_examples=10, seed=3)
    assert len(drawn[first.task_id]) == 10
    assert {e.messages[-1].content for e in drawn[first.task_id]} == {"alpha"}
