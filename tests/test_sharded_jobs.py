"""Jobs of the queue on several training processes (SCULPTOR_TRAIN_GPUS=2): torchrun launched by the job,
two gloo ranks on this CPU, FSDP2 with the constraint on shards (worker/training/sharded_round.py).

- two jobs in a row train on the ranks (the first is promoted); each candidate's update is a fixed point of the
  one-process projector built from the parent's registry bases *and task memory*, so the ranks applied
  both (the second job's parent has a memory);
- a cancel while the ranks train ends the job as cancelled, and no rank is left running;
- a rank that dies fails the job with `sharded_training_failed`, no rank is left, and v0 keeps serving.
"""

import signal
import subprocess
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from sculptor import checkpoints
from sculptor.bootstrap import ensure_initial_version
from sculptor.capacity import OSFTConfig
from sculptor.config import Settings
from sculptor.context import Context
from tests.test_pipeline import SMALL_GATES, examples, submit
from worker import osft, pipeline
from worker.osft.projector import Projector

RANK = "worker.training.distributed --model-dir"  # in a rank's command line and torchrun's


@pytest.fixture
def ctx(tmp_path, redis_url, tiny_learner_dir):
    settings = Settings(var_dir=tmp_path / "var", redis_url=redis_url, base_model_dir=str(tiny_learner_dir),
                        train_gpus=2, **SMALL_GATES)
    context = Context.from_settings(settings)
    context.redis.flushdb()
    ensure_initial_version(settings, context.redis, context.store)
    return context


def rank_processes() -> list[int]:
    """The ranks (not torchrun itself) of any sharded round still running."""
    out = subprocess.run(["pgrep", "-f", RANK], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in out
            if "torch.distributed.run" not in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")]


def weights(ctx, version: str) -> dict[str, torch.Tensor]:
    model_dir = checkpoints.fetch(ctx.store, version, ctx.settings.checkpoint_cache_dir)
    return load_file(model_dir / "model.safetensors")


def assert_update_in_constraint(ctx, parent: str, child: str, job) -> int:
    """Every projected matrix's update (child − parent) is left unchanged by the one-process projector of
    the parent's bases, rank and task memory; returns the memory directions those projectors protected."""
    registry = osft.SubspaceRegistry(ctx.redis, ctx.store)
    plans = job.training.constraint.matrices
    names = [n for n, p in plans.items() if p.k > 0 and not p.spent]
    before, after = weights(ctx, parent), weights(ctx, child)
    bases = registry.load_bases(parent, {n: before[f"{n}.weight"] for n in names}, {n: plans[n].k for n in names})
    memory_directions = 0
    for name in names:
        key = f"{name}.weight"
        projector = Projector(before[key], bases[name], plans[name].k, bases[name].memory, OSFTConfig().memory_share)
        memory_directions += projector.memory_rank
        delta = after[key] - before[key]
        projected = after[key].clone()
        projector.project_(projected, before[key])
        assert delta.norm() > 0, f"{name} did not train"
        assert (projected - after[key]).norm() <= 1e-4 * delta.norm(), f"{name} left its constraint set"
    return memory_directions


def test_two_jobs_train_on_two_ranks_within_the_constraint_and_the_memory(ctx):
    _, first = submit(ctx, "greet", examples("say the greeting", "hello world"))
    done = pipeline.run_job(ctx, first.job_id)
    assert done.status == "promoted", done.error
    assert done.training.train_processes == 2 and done.progress.step == done.progress.total_steps > 0
    assert_update_in_constraint(ctx, "v0", "v1", done)

    # The tiny model does not learn this second task enough to pass its gate; its candidate is what matters.
    _, second = submit(ctx, "farewell", examples("say the farewell", "good bye"))
    done = pipeline.run_job(ctx, second.job_id)
    assert done.status in ("promoted", "rejected"), done.error
    assert done.candidate_version == "v2" and done.training.train_processes == 2
    assert assert_update_in_constraint(ctx, "v1", "v2", done) > 0  # the first task's memory was protected
    assert rank_processes() == []


def when_training(ctx, job_id: str, then) -> threading.Thread:
    """Run `then()` once the job reports a training step (the ranks are up), in a thread."""
    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = ctx.jobs.get(job_id)
            if job.progress and job.progress.step > 0:
                then()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def test_a_cancel_while_the_ranks_train_ends_the_job_and_every_rank(ctx):
    _, job = submit(ctx, "greet", examples("say the greeting", "hello world", n=120), epochs=64)
    watcher = when_training(ctx, job.job_id, lambda: ctx.jobs.update(job.job_id, cancel_requested=True))
    done = pipeline.run_job(ctx, job.job_id)
    watcher.join()
    assert done.status == "cancelled" and "cancelled" in done.error
    assert rank_processes() == []
    assert ctx.versions.current() == "v0" and ctx.versions.count() == 1


def test_a_rank_that_dies_fails_the_job_and_no_rank_is_left(ctx):
    _, job = submit(ctx, "greet", examples("say the greeting", "hello world", n=120), epochs=64)
    killed = []

    def kill_one_rank():
        pid = rank_processes()[-1]
        killed.append(pid)
        subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(pid)], check=True)

    watcher = when_training(ctx, job.job_id, kill_one_rank)
    done = pipeline.run_job(ctx, job.job_id)
    watcher.join()
    assert killed, "no rank was seen training"
    assert done.status == "failed" and done.error_code == "sharded_training_failed", done.error
    assert "2 processes" in done.error
    assert rank_processes() == []
    assert ctx.versions.current() == "v0" and ctx.versions.count() == 1
