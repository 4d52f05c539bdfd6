"""The subspace registry's storage stays bounded (issue 18): one side of each SVD stored (the other rebuilt from
the weights), shared-input memories stored once, the bytes each version takes, and the bases pruned to the
head and the newest promoted versions, the task memory kept."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from sculptor.config import Settings
from sculptor.datasets import Hyperparameters
from sculptor.storage import ObjectStore
from sculptor.subspace_records import MatrixRecord, SubspaceRecord
from tests.test_osft_invariant import chat_batches
from worker.osft import SubspaceRegistry, build_constraint, record_version
from worker.osft.memory import protected_directions
from worker.osft.projector import Projector
from worker.osft.subspace import DERIVABLE_MIN_RATIO, Bases, compute_bases
from worker.training.loop import train

BASES, MEMORY = "registry/{}/bases.safetensors", "registry/{}/memory.safetensors"


class CapturingRegistry(SubspaceRegistry):
    """Keeps what the worker handed over to be stored, to compare with what comes back."""

    def store_bases(self, version, bases):
        self.handed = {name: b.memory for name, b in bases.items()}
        return super().store_bases(version, bases)


def stored_tensor_count(store: ObjectStore, key: str, tmp_path, suffix: str = "") -> int:
    with safe_open(str(store.get_file(key, tmp_path / "read.safetensors")), framework="pt") as f:
        return sum(k.endswith(suffix) for k in f.keys())


def close_columns(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Each column of `a` within 1e-3 of its norm in `b`: the storage's fp16 directions, stored once or again."""
    return a.dtype == torch.float32 and bool(((a - b).norm(dim=0) < 1e-3 * b.norm(dim=0)).all())


def same_memory(loaded: torch.Tensor, handed: torch.Tensor) -> bool:
    """Equal up to the storage's fp16 directions, and not bit-equal (the test would not see an fp32 file)."""
    return close_columns(loaded, handed) and not torch.equal(loaded, handed)


def test_memories_of_matrices_that_share_their_input_are_stored_once(tiny_model_dir, redis_client, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    registry = CapturingRegistry(redis_client, store)
    batches = chat_batches(tiny_model_dir, epochs=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    first = build_constraint(model, Hyperparameters(), "base", registry, batches[:1])
    train(model, batches, first, learning_rate=1e-2, steps_per_epoch=len(batches), bf16_autocast=False)
    record_version(registry, model, "v1", "base", "task-1", first, memory_batches=batches)
    # A second task grows the loaded (stored once) memories: still equal where the inputs are shared.
    second = build_constraint(model, Hyperparameters(), "v1", registry, batches[:1])
    record = record_version(registry, model, "v2", "v1", "task-2", second, memory_batches=batches)

    handed = registry.handed
    for layer in (0, 1):
        attention, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        assert torch.equal(handed[f"{attention}.q_proj"], handed[f"{attention}.k_proj"])
        assert torch.equal(handed[f"{attention}.q_proj"], handed[f"{attention}.v_proj"])
        assert torch.equal(handed[f"{mlp}.gate_proj"], handed[f"{mlp}.up_proj"])
    # 4 inputs a layer: 8 memories, each as fp16 directions and fp32 norms
    assert stored_tensor_count(store, MEMORY.format("v2"), tmp_path, ".memory") == 8 < len(handed) == 14
    assert stored_tensor_count(store, MEMORY.format("v2"), tmp_path, ".memory.norms") == 8
    names = list(handed)
    loaded = registry.load_memory("v2", names)
    assert set(loaded) == set(names) and all(same_memory(loaded[n], handed[n]) for n in names)
    stored = registry.load_stored("v2", names)
    assert all(same_memory(stored[n]["memory"], handed[n]) for n in names)
    assert record.stored_bytes == store.size(BASES.format("v2")) + store.size(MEMORY.format("v2"))
    assert registry.get("base").stored_bytes == store.size(BASES.format("base"))  # a root: bases, no memory


def test_one_side_is_stored_and_the_other_is_rebuilt_from_the_weights(redis_client, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    registry = SubspaceRegistry(redis_client, store)
    torch.manual_seed(0)
    weights = {"wide": torch.randn(48, 128), "tall": torch.randn(128, 48), "square": torch.randn(64, 64)}
    full = {name: compute_bases(w) for name, w in weights.items()}
    put_version(registry, "v1", full)

    with safe_open(str(store.get_file(BASES.format("v1"), tmp_path / "read.safetensors")), framework="pt") as f:
        assert set(f.keys()) == {"wide.S", "wide.U", "tall.S", "tall.Vh", "square.S", "square.U"}
    whole = sum(b.U.numel() + b.S.numel() + b.Vh.numel() for b in full.values()) * 4
    assert store.size(BASES.format("v1")) < 0.5 * whole  # 48² + 48² + 64² floats of 3·48·128 + 2·64²

    ranks = {"wide": 40, "tall": 30, "square": 50}
    loaded = registry.load_bases("v1", weights, ranks)
    for name, weight in weights.items():
        k = ranks[name]
        assert loaded[name].U.shape[1] in (k, min(weight.shape)) and loaded[name].Vh.shape[0] in (k, min(weight.shape))
        for vectors in (loaded[name].U, loaded[name].Vh.T):  # rebuilt or stored: orthonormal either way
            assert (vectors.T @ vectors - torch.eye(vectors.shape[1])).abs().max() <= 1e-5, name
        # The same constraint as the whole SVD's: a step projects to the same update.
        step = torch.randn_like(weight)
        ours, theirs = weight + step, weight + step
        Projector(weight, loaded[name], k).project_(ours, weight)
        Projector(weight, full[name], k).project_(theirs, weight)
        assert (ours - theirs).norm() <= 1e-5 * (theirs - weight).norm(), name
        assert (theirs - weight).norm() > 0.1 * step.norm()


def test_a_side_that_cannot_be_rebuilt_exactly_is_a_miss(redis_client, tmp_path):
    registry = SubspaceRegistry(redis_client, ObjectStore(tmp_path.as_uri()))
    torch.manual_seed(0)
    singular = torch.linspace(1.0, 1e-2 * DERIVABLE_MIN_RATIO, 32)  # the last directions carry next to nothing
    left, _ = torch.linalg.qr(torch.randn(32, 32))
    right, _ = torch.linalg.qr(torch.randn(96, 32))
    weight = left @ torch.diag(singular) @ right.T
    put_version(registry, "v1", {"m": compute_bases(weight)})
    assert registry.load_bases("v1", {"m": weight}, {"m": 24}) is not None
    assert registry.load_bases("v1", {"m": weight}, {"m": 32}) is None  # the job's SVD runs again


def test_memory_is_stored_in_half_the_bytes_and_protects_the_same_directions(redis_client, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    registry = SubspaceRegistry(redis_client, store)
    torch.manual_seed(0)
    directions, _ = torch.linalg.qr(torch.randn(256, 96))
    factor = directions * torch.logspace(0, -3, 96)  # as memory.grow_memory leaves it: orthogonal, norms falling
    bases = {"m": compute_bases(torch.randn(64, 256))}
    bases["m"].memory = factor
    put_version(registry, "v1", bases)
    fp32_bytes = factor.numel() * 4
    assert store.size(MEMORY.format("v1")) < 0.52 * fp32_bytes
    loaded = registry.load_memory("v1", ["m"])["m"]
    assert same_memory(loaded, factor)
    # What a job protects from it: the same directions (the whole memory, and its strongest half), to the
    # sine of the largest angle between them.
    for limit in (96, 48):
        ours = protected_directions(loaded, torch.zeros(256, 0), limit)
        theirs = protected_directions(factor, torch.zeros(256, 0), limit)
        assert torch.linalg.matrix_norm(ours @ ours.T - theirs @ theirs.T, ord=2) < 1e-3  # the largest tilt


def small_bases(seed: int, memory: bool = True) -> dict[str, Bases]:
    torch.manual_seed(seed)
    bases = {name: compute_bases(torch.randn(6, 4)) for name in ("layers.0.q", "layers.0.k")}
    for b in bases.values():
        b.memory = torch.randn(4, 2) if memory else None
    return bases


def put_version(registry: SubspaceRegistry, version: str, bases: dict[str, Bases]) -> None:
    uri = registry.store_bases(version, bases)
    matrices = {name: MatrixRecord(m=4, k=2, protected_ratio=0.5, spent=False, memory_directions=2) for name in bases}
    registry.put(SubspaceRecord(version=version, matrices=matrices, bases_uri=uri,
                                stored_bytes=registry.stored_bytes(version)))


def test_memory_files_written_before_the_map_still_load(redis_client, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    registry = SubspaceRegistry(redis_client, store)
    put_version(registry, "v1", small_bases(0))
    older = small_bases(1)  # files as written before: one `<name>.memory` per matrix, no metadata
    save_file({f"{name}.memory": b.memory for name, b in older.items()}, tmp_path / "memory.safetensors")
    store.put_file(tmp_path / "memory.safetensors", MEMORY.format("v1"))
    names = list(older)
    assert all(torch.equal(registry.load_memory("v1", names)[n], older[n].memory) for n in names)
    assert all(torch.equal(registry.load_stored("v1", names)[n]["memory"], older[n].memory) for n in names)


def test_pruning_deletes_the_bases_and_keeps_every_memory(redis_client, tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    registry = SubspaceRegistry(redis_client, store)
    stored = {version: small_bases(seed) for seed, version in enumerate(("v1", "v2", "v3"))}
    for version, bases in stored.items():
        put_version(registry, version, bases)
    # v1 as stored before the memory had its own file: inside the bases file, which pruning deletes.
    store.delete(MEMORY.format("v1"))
    save_file({f"{name}.{part}": getattr(b, part) for name, b in stored["v1"].items()
               for part in ("U", "S", "Vh", "memory")}, tmp_path / "old.safetensors")
    store.put_file(tmp_path / "old.safetensors", BASES.format("v1"))
    names = list(stored["v1"])

    assert registry.prune_bases({"v3"}) == ["v1", "v2"]
    for version in ("v1", "v2"):
        record = registry.get(version)
        assert record.bases_uri is None and not store.exists(BASES.format(version))
        assert registry.load_stored(version, names) is None  # a miss: the next job recomputes them
        memory = registry.load_memory(version, names)
        assert all(same_memory(memory[n], stored[version][n].memory) for n in names)  # v1's moved, in fp16 now
        assert record.stored_bytes == store.size(MEMORY.format(version))
        assert registry.summary(version).stored_bytes == record.stored_bytes and not registry.summary(version).has_bases
    assert registry.load_stored("v3", names) is not None and registry.get("v3").bases_uri
    assert registry.prune_bases({"v3"}) == []  # nothing left to prune


def test_object_size_is_the_stored_bytes(tmp_path):
    store = ObjectStore(tmp_path.as_uri())
    store.put_bytes("registry/v1/x.bin", b"12345")
    assert store.size("registry/v1/x.bin") == 5
    with pytest.raises(FileNotFoundError):
        store.size("registry/v1/missing.bin")


def test_bases_retention_setting(monkeypatch):
    assert Settings().registry_keep_bases == 3
    monkeypatch.setenv("SCULPTOR_REGISTRY_KEEP_BASES", "5")
    assert Settings().registry_keep_bases == 5
    monkeypatch.setenv("SCULPTOR_REGISTRY_KEEP_BASES", "0")
    with pytest.raises(ValueError, match=re.escape("registry_keep_bases")):
        Settings()


@pytest.fixture
def keep_one_ctx(tmp_path, redis_url, redis_client, tiny_learner_dir):
    from sculptor.bootstrap import ensure_initial_version
    from sculptor.context import Context
    from tests.test_pipeline import SMALL_GATES

    settings = Settings(var_dir=tmp_path / "var", redis_url=redis_url, base_model_dir=str(tiny_learner_dir),
                        registry_keep_bases=1, **SMALL_GATES)
    context = Context.from_settings(settings)
    ensure_initial_version(settings, context.redis, context.store)
    return context


def test_a_rejected_candidate_loses_its_bases_keeps_its_memory_and_can_be_forced(keep_one_ctx):
    from sculptor import lineage
    from service.api.routes.registry import registry_overview
    from tests.test_pipeline import examples, submit
    from worker import pipeline

    ctx = keep_one_ctx
    store, registry = ctx.store, SubspaceRegistry(ctx.redis, ctx.store)
    _, job = submit(ctx, "barely", examples("name the colour", "blue sky"), learning_rate=1e-7, epochs=1)
    rejected = pipeline.run_job(ctx, job.job_id)
    assert rejected.status == "rejected" and rejected.candidate_version == "v1"
    assert rejected.training.subspace.stored_bytes > 0  # the job report says what its candidate stored
    assert not store.exists(BASES.format("v1")) and registry.get("v1").bases_uri is None
    assert store.exists(BASES.format("v0"))  # the head keeps its bases
    names = list(registry.get("v1").matrices)
    memory = registry.load_memory("v1", names)
    assert memory and all(m.shape[1] > 0 for m in memory.values())
    assert registry.get("v1").stored_bytes == store.size(MEMORY.format("v1"))

    lineage.force_promote(ctx.versions, ctx.jobs, ctx.store, rejected)
    # Without the memory's protection, so that the tiny model has the room to learn a second task; the job
    # passes v1's memory on unchanged, which shows that it found it.
    _, job = submit(ctx, "greet", examples("say the greeting", "hello world"), task_memory=False)
    done = pipeline.run_job(ctx, job.job_id)
    assert done.status == "promoted", done.error
    assert done.training.constraint.registry_hit is False and done.training.constraint.memory_lost == []
    assert all(m.memory_directions == memory[name].shape[1] for name, m in registry.get("v2").matrices.items())

    # Kept: the head v2 (the newest promoted); v1's bases, stored again by the SVD of job 2, and v0's are pruned.
    assert store.exists(BASES.format("v2")) and not store.exists(BASES.format("v1"))
    assert not store.exists(BASES.format("v0"))
    again = registry.load_memory("v1", names)  # stored again with the bases, through fp16 once more
    assert all(close_columns(again[n], memory[n]) for n in names)

    overview = registry_overview(ctx)
    sizes = {v.version: v.stored_bytes for v in overview.versions}
    assert sizes["v1"] == store.size(MEMORY.format("v1")) and sizes["v0"] == 0
    assert sizes["v2"] == store.size(BASES.format("v2")) + store.size(MEMORY.format("v2"))
    assert overview.stored_bytes == sum(sizes.values())
    assert json.loads(overview.model_dump_json())["stored_bytes"] == overview.stored_bytes
