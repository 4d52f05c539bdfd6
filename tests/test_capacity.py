"""Capacity over long streams (issue 18): every task keeps room to learn, a job with none fails with
`capacity_exhausted`, and the task memory is never dropped on the way."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sculptor.capacity import trainable_rank
from sculptor.datasets import Hyperparameters
from sculptor.storage import ObjectStore
from tests.test_pipeline import ctx  # noqa: F401  (the in-process job fixture)
from worker.osft import CapacityExhausted, OSFTConfig, SubspaceRegistry, build_constraint, record_version
from worker.osft.constraint import SubspaceConstraint, plan_matrices, require_capacity
from worker.osft.subspace import compute_bases
from worker.training.data import make_batches, tokenize_chat
from worker.training.loop import train

OLD = OSFTConfig(max_grown_ratio=1.0)  # the schedule before issue 18: k grows with every task, unbounded
SHAPES = {f"model.layers.{i}.{name}": shape for i in range(2) for name, shape in
          {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128), "mlp.up_proj": (256, 128),
           "mlp.down_proj": (128, 256)}.items()}


def plan_stream(config: OSFTConfig, jobs: int) -> list[int]:
    """Plan `jobs` jobs in a row (the planner alone); the smallest trainable rank of each, memory saturated."""
    record, rooms = None, []
    for job in range(jobs):
        plans = plan_matrices(SHAPES, {}, record, config)
        require_capacity(plans, config, job)
        rooms.append(min(0 if p.spent else trainable_rank(SHAPES[n], p.k, 10**6 if job else 0, config.memory_share)
                         for n, p in plans.items()))
        record = {"tasks": [None] * (job + 1), "matrices": {n: {"k": p.k} for n, p in plans.items()}}
    return rooms


def test_the_shipped_policy_keeps_room_for_a_thousand_tasks_where_the_old_one_ran_out():
    with pytest.raises(CapacityExhausted):
        plan_stream(OLD, 30)
    rooms = plan_stream(OSFTConfig(), 1000)
    assert min(rooms) >= 6 and rooms[-1] == rooms[100]  # k = 0.9 m from the 6th task on: 6 rows of k_proj
    first = plan_matrices(SHAPES, {}, None, OSFTConfig())
    assert first == plan_matrices(SHAPES, {}, None, OLD)  # the first task plans the same under both


def test_a_parent_k_above_the_ceiling_comes_back_down_with_the_memory_only():
    record = {"tasks": ["t"] * 40, "matrices": {n: {"k": min(s)} for n, s in SHAPES.items()}}  # spent lineage
    assert all(p.spent for p in plan_matrices(SHAPES, {}, record, OSFTConfig(task_memory=False)).values())
    plans = plan_matrices(SHAPES, {}, record, OSFTConfig())
    assert all(not p.spent and p.k == round(0.9 * p.m) for p in plans.values())


def task_batches(tokenizer, task: int):
    words = ["river", "stone", "cloud", "ember", "frost", "meadow", "harbor", "lantern"]
    chats = [[{"role": "user", "content": f"task {task}: {w}?"}, {"role": "assistant", "content": f"{w} {task} {w}"}]
             for w in words]
    return make_batches([tokenize_chat(tokenizer, c, 48) for c in chats], 4, 2, tokenizer.pad_token_id)


@torch.no_grad()
def loss_on(model, batches) -> float:
    return sum(float(model(**batch).loss) for batch in batches) / len(batches)


def run_stream(model_dir, registry, config: OSFTConfig, jobs: int) -> list[float]:
    """`jobs` tasks in a row through the registry; each job's drop in its own task's loss."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parent, drops = "base", []
    for job in range(1, jobs + 1):
        batches = task_batches(tokenizer, job)
        constraint = build_constraint(model, Hyperparameters(), parent, registry, batches[:1], config=config)
        before = loss_on(model, batches)
        train(model, batches, constraint, learning_rate=1e-2, steps_per_epoch=2, bf16_autocast=False)
        drops.append(before - loss_on(model, batches))
        record_version(registry, model, f"{config.max_grown_ratio}-v{job}", parent, f"task-{job}", constraint,
                       memory_batches=batches)
        parent = f"{config.max_grown_ratio}-v{job}"
    return drops


def test_a_stream_that_spends_the_old_schedule_keeps_learning_under_the_new_one(tiny_model_dir, redis_client,
                                                                                 tmp_path):
    registry = SubspaceRegistry(redis_client, ObjectStore(tmp_path.as_uri()))
    # At a uniform ratio of 0.9 the old schedule spends every 128-wide matrix at the 10th task.
    old = OSFTConfig(adaptive_ranks=False, mean_protected_ratio=0.9, max_grown_ratio=1.0)
    with pytest.raises(CapacityExhausted, match="all 14 target matrices are spent"):
        run_stream(tiny_model_dir, registry, old, 12)
    drops = run_stream(tiny_model_dir, registry, OSFTConfig(adaptive_ranks=False, mean_protected_ratio=0.9), 12)
    assert all(drop > 0 for drop in drops), drops  # every task still learns, the 10th to 12th included
    summary = registry.summary("0.9-v12")
    assert 0 < summary.remaining_capacity < 1 - summary.protected_fraction  # the memory takes its share


def test_capacity_exhausted_fails_the_job_with_its_code_and_what_to_do(ctx):  # noqa: F811
    from tests.test_pipeline import examples, submit
    from worker import pipeline

    _, job = submit(ctx, "full-up", examples("say the greeting", "hello world", n=8),
                    mean_protected_ratio=0.99, min_protected_ratio=0.99, max_protected_ratio=0.99, task_memory=False)
    done = pipeline.run_job(ctx, job.job_id)
    assert done.status == "failed" and done.error_code == "capacity_exhausted"
    assert "target matrices are spent" in done.error and "task_memory on" in done.error
    assert "empty parameter list" not in done.error and ctx.versions.current() == "v0"


def test_a_registry_miss_recomputes_the_bases_and_keeps_the_memory(tiny_model_dir, redis_client, tmp_path):
    from tests.test_osft_invariant import chat_batches
    from tests.test_registry_storage import close_columns

    store = ObjectStore(tmp_path.as_uri())
    registry = SubspaceRegistry(redis_client, store)
    batches = chat_batches(tiny_model_dir, epochs=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    first = build_constraint(model, Hyperparameters(), "base", registry, batches[:1])
    train(model, batches, first, learning_rate=1e-2, steps_per_epoch=len(batches), bf16_autocast=False)
    record_version(registry, model, "v1", "base", "task-1", first, memory_batches=batches)
    memory = registry.load_memory("v1", list(first.targets))
    assert set(memory) == set(first.targets) and all(m is not None and m.shape[1] > 0 for m in memory.values())

    store.delete("registry/v1/bases.safetensors")  # the bases are lost, e.g. evicted
    again = build_constraint(model, Hyperparameters(), "v1", registry, batches[:1])
    assert again.report()["registry_hit"] is False and again.report()["memory_lost"] == []
    assert all(torch.equal(again.memory[name], memory[name]) for name in memory)
    assert all(p.memory_rank > 0 for p in again.plans.values())  # and the job protects it
    stored = registry.load_stored("v1", list(first.targets))  # the bases stored again, the memory with them
    assert all(close_columns(stored[name]["memory"], memory[name]) for name in memory)  # through fp16 again


def test_a_job_without_the_memory_passes_the_lineages_memory_on(tiny_model_dir, redis_client, tmp_path):
    from tests.test_osft_invariant import chat_batches
    from tests.test_registry_storage import close_columns

    registry = SubspaceRegistry(redis_client, ObjectStore(tmp_path.as_uri()))
    batches = chat_batches(tiny_model_dir, epochs=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    first = build_constraint(model, Hyperparameters(), "base", registry, batches[:1])
    record_version(registry, model, "v1", "base", "task-1", first, memory_batches=batches)
    memory = registry.load_memory("v1", list(first.targets))

    opted_out = build_constraint(model, Hyperparameters(task_memory=False), "v1", registry, batches[:1])
    assert not any(p.memory_rank for p in opted_out.plans.values())  # this job alone is not held by it
    record = record_version(registry, model, "v2", "v1", "task-2", opted_out, memory_batches=batches)
    assert all(m.memory_directions == memory[name].shape[1] for name, m in record.matrices.items())

    after = build_constraint(model, Hyperparameters(), "v2", registry, batches[:1])
    assert all(close_columns(after.memory[name], memory[name]) for name in memory)  # v2 stored it again (fp16)
    assert all(p.memory_rank > 0 for p in after.plans.values())


def test_a_spent_matrix_stops_while_the_others_train():
    # Formerly part of test_osft_invariant's all-spent test (which now fails the job): layer 0's matrix
    # is spent through a memory-less lineage's floor, layer 1's still trains.
    layers = torch.nn.ModuleList(torch.nn.Linear(16, 16, bias=False) for _ in range(2))
    targets = {f"model.layers.{i}.self_attn.q_proj": layer for i, layer in enumerate(layers)}
    config = OSFTConfig(task_memory=False, adaptive_ranks=False)
    record = {"tasks": ["t"], "matrices": {"model.layers.0.self_attn.q_proj": {"k": 16}}}
    plans = plan_matrices({name: (16, 16) for name in targets}, {}, record, config)
    bases = {name: compute_bases(module.weight) for name, module in targets.items()}
    constraint = SubspaceConstraint(layers, targets, plans, bases, config, ["t"], {}, False)
    assert constraint.report()["spent_matrices"] == ["model.layers.0.self_attn.q_proj"]
    assert constraint.trainable_parameters() == [layers[1].weight]


def test_the_method_config_is_the_one_source_of_the_per_task_knobs():
    """Each knob a task may set is an OSFTConfig field with a Hyperparameters field of the same name, and
    a task's value wins over the default."""
    import dataclasses

    from sculptor.capacity import OSFTConfig
    from sculptor.datasets import Hyperparameters

    fields = {f.name for f in dataclasses.fields(OSFTConfig)}
    assert set(OSFTConfig.PER_TASK) <= fields and set(OSFTConfig.PER_TASK) <= set(Hyperparameters.model_fields)
    hp = Hyperparameters(mean_protected_ratio=0.98, task_memory=False, general_chat_memory=True)
    config = OSFTConfig.from_hyperparameters(hp)
    assert (config.mean_protected_ratio, config.task_memory, config.general_chat_memory) == (0.98, False, True)
    assert config.max_protected_ratio == 0.98 and config.min_protected_ratio == OSFTConfig.min_protected_ratio
    assert OSFTConfig.from_hyperparameters(Hyperparameters()) == OSFTConfig()
