"""The subspace registry: records in real Redis, bases in the object store, no SVD a job can load."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sculptor.datasets import Hyperparameters
from sculptor.storage import ObjectStore
from tests.test_osft_invariant import chat_batches
from worker.osft import SubspaceRegistry, build_constraint, record_version
from worker.training.loop import train


@pytest.fixture
def svd_calls(monkeypatch):
    calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        calls.append(args[0].shape)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    return calls


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def allowed(side) -> torch.Tensor:
    """The side's I − P as a matrix, however it is held (protected basis or complement)."""
    outer = side.basis @ side.basis.T
    return outer if side.complement else torch.eye(outer.shape[0]) - outer


def test_round_trip_and_no_svd_for_a_known_parent(tiny_model_dir, redis_client, tmp_path, svd_calls):
    registry = SubspaceRegistry(redis_client, ObjectStore(tmp_path.as_uri()))
    batches = chat_batches(tiny_model_dir, epochs=1)

    # Job 1 on the base model: one SVD per target matrix, stored for the next job.
    model = load(tiny_model_dir)
    first = build_constraint(model, Hyperparameters(), "base", registry, batches[:2])
    assert len(svd_calls) == 14 and first.report()["registry_hit"] is False
    train(model, batches, first, learning_rate=1e-2, steps_per_epoch=len(batches))
    record = record_version(registry, model, "v1", "base", "task-1", first)
    assert len(svd_calls) == 28  # the next version's bases, computed once after training

    stored = json.loads(redis_client.get("sculptor:registry:version:v1"))
    assert stored == dataclasses.asdict(record) and registry.get("v1") == record
    assert record.parent_version == "base" and record.tasks == ["task-1"]
    assert record.bases_uri.startswith(tmp_path.as_uri())
    assert record.method == "osft" and record.config == first.config  # the resolved method config, kept
    for name, matrix in record.matrices.items():
        assert matrix.m == 128 and matrix.k == first.plans[name].k
    assert registry.list_versions() == ["base", "v1"]

    # Job 2 on the same parent: bases come from the registry, no SVD at all.
    second = build_constraint(load(tiny_model_dir), Hyperparameters(), "base", registry, batches[:2])
    assert len(svd_calls) == 28 and second.report()["registry_hit"] is True
    for name, projector in second.projectors.items():  # the stored side as computed, the other rebuilt
        for side in ("left", "right"):
            torch.testing.assert_close(allowed(getattr(projector, side)), allowed(getattr(first.projectors[name], side)),
                                       atol=1e-5, rtol=0)

    # Job 3 on v1 (the trained weights): loads v1's bases; protection grows, never below v1's ranks.
    third = build_constraint(model, Hyperparameters(), "v1", registry, batches[:2])
    assert len(svd_calls) == 28 and third.report()["registry_hit"] is True
    assert third.report()["tasks_absorbed"] == 1
    for name, plan in third.plans.items():
        assert plan.k >= first.plans[name].k
    assert third.report()["protected_fraction"] > first.report()["protected_fraction"]


def test_missing_bases_are_recomputed_and_stored(tiny_model_dir, redis_client, tmp_path, svd_calls):
    store = ObjectStore(tmp_path.as_uri())
    registry = SubspaceRegistry(redis_client, store)
    batches = chat_batches(tiny_model_dir, epochs=1)
    build_constraint(load(tiny_model_dir), Hyperparameters(), "base", registry, batches[:1])
    store.delete("registry/base")

    again = build_constraint(load(tiny_model_dir), Hyperparameters(), "base", registry, batches[:1])
    assert again.report()["registry_hit"] is False and len(svd_calls) == 28
    assert store.exists("registry/base/bases.safetensors")
    third = build_constraint(load(tiny_model_dir), Hyperparameters(), "base", registry, batches[:1])
    assert third.report()["registry_hit"] is True and len(svd_calls) == 28


def test_summary_reports_capacity_per_layer(tiny_model_dir, redis_client, tmp_path):
    registry = SubspaceRegistry(redis_client, ObjectStore(tmp_path.as_uri()))
    batches = chat_batches(tiny_model_dir, epochs=1)
    model = load(tiny_model_dir)
    constraint = build_constraint(model, Hyperparameters(adaptive_ranks=False), "base", registry, batches[:1])
    record_version(registry, model, "v1", "base", "task-1", constraint)

    summary = registry.summary("v1")
    assert summary.tasks == ["task-1"] and summary.parent_version == "base"
    assert summary.protected_fraction == pytest.approx(96 / 128)
    # What the next job (default hyperparameters, 1 task absorbed) can train: k grows from 96 to 101.
    assert summary.remaining_capacity == pytest.approx(27 / 128, abs=1e-4)
    assert set(summary.layers) == {"0", "1"}
    assert summary.layers["0"].protected_fraction == pytest.approx(0.75)
    assert registry.summary("base").protected_fraction == 0.0
    assert registry.summary("nope") is None
