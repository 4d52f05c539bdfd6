"""The subspace registry's records: per model version, how much of each matrix is protected.

Redis holds one JSON record per version under `sculptor:registry:version:<version>` and an index
(sorted set by creation time) under `sculptor:registry:index`. A record is a `SubspaceRecord` (its
matrices `MatrixRecord`s), validated when it is read: one that does not fit raises CorruptRecord.
It also keeps the method and the resolved `OSFTConfig` the version was trained with, as PEFT keeps its
config beside the weights.

`k` is the rank protected when this version was trained: the floor for every later job.
This is the registry's read side (and the record write): no torch, so the gateway serves it (GET /registry).
The bases and the task memory, tensors in the object store, are the worker's (worker/osft/registry.py:
`SubspaceRegistry` extends this class with them, and prunes the bases of all but the newest versions);
`stored_bytes` says what a version's take there.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Literal

from sculptor.capacity import OSFTConfig, allocate_rank, is_spent, layer_index, trainable_rank
from sculptor.stored_records import from_dict, parse_dataclass

PREFIX = "sculptor:registry:"
INDEX_KEY = PREFIX + "index"

# Plain dataclasses, not pydantic models: worker/osft reads and writes these records where only torch is
# installed (bench/gpu_check.py). sculptor/stored_records.py checks their types when they are read, and
# pydantic validates them all the same as fields of a model (TrainingSummary.subspace, GET /registry).


def record_key(version: str) -> str:
    return f"{PREFIX}version:{version}"


@dataclass
class MatrixRecord:
    """One target matrix of a version: how much of its rank is protected."""

    m: int  # min(out, in): the full rank
    k: int  # rank protected when this version was trained: the floor for every later job
    protected_ratio: float
    spent: bool  # no room left to learn in: frozen
    shape: list[int] | None = None  # [out, in]; None in records from before shapes were stored
    importance: float | None = None  # the layer score that set the ratio (None: uniform or no score)
    memory_directions: int = 0  # task memory: earlier tasks' input directions stored for this matrix


@dataclass
class SubspaceRecord:
    """The registry's record of one version."""

    version: str
    matrices: dict[str, MatrixRecord]
    parent_version: str | None = None
    tasks: list[str] = field(default_factory=list)  # the tasks that shaped this version, oldest first
    created_at: float = field(default_factory=time.time)
    bases_uri: str | None = None  # object-store URI of the bases (reduced SVD per matrix), if stored
    stored_bytes: int | None = None  # bases and task memory in the object store (None: not counted then)
    svd_s: float | None = None
    general_chat_memory: bool = False  # the task memory holds everyday chat's input directions
    method: Literal["osft", "full"] | None = None  # how this version was trained (None: not trained here)
    config: OSFTConfig | None = None  # the resolved method config it was trained with

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


@dataclass
class LayerCapacity:
    protected_fraction: float  # Σk / Σm over the layer's target matrices
    remaining_capacity: float  # Σ trainable rank of a next job / Σm
    task_memory_directions: int


@dataclass
class CapacitySummary:
    """A version's capacity (SubspaceRecords.summary): what GET /registry reports."""

    version: str
    parent_version: str | None
    tasks: list[str]
    has_bases: bool
    stored_bytes: int | None  # its bases and task memory in the object store (None: recorded before counted)
    protected_fraction: float
    remaining_capacity: float
    spent_matrices: list[str]
    # Input directions of the tasks learned so far, protected on top of the top-k (worker/osft/memory.py).
    task_memory_directions: int
    layers: dict[str, LayerCapacity]  # decoder layer index (or "other") -> its capacity


@dataclass
class RegistryVersion(CapacitySummary):
    """GET /registry/{version}: the capacity summary plus every matrix's record."""

    matrices: dict[str, MatrixRecord]


class SubspaceRecords:
    def __init__(self, redis_client):
        self.redis = redis_client

    def get(self, version: str) -> SubspaceRecord | None:
        """The stored record, validated (CorruptRecord when it does not fit), or None."""
        raw = self.redis.get(record_key(version))
        return parse_dataclass(SubspaceRecord, raw, record_key(version)) if raw else None

    def put(self, record: SubspaceRecord | dict) -> SubspaceRecord:
        record = from_dict(SubspaceRecord, record)  # a dict is checked before it is written
        pipe = self.redis.pipeline()
        pipe.set(record_key(record.version), record.to_json())
        pipe.zadd(INDEX_KEY, {record.version: record.created_at})
        pipe.execute()
        return record

    def list_versions(self) -> list[str]:
        """Versions with a record, oldest first."""
        return list(self.redis.zrange(INDEX_KEY, 0, -1))

    def summary(self, version: str, config: OSFTConfig | None = None) -> CapacitySummary | None:
        """Capacity for the API: protected fraction (Σk / Σm) per decoder layer and overall, and the
        remaining capacity: Σ trainable rank / Σm of a next job on this version with `config` (default
        hyperparameters, uniform mean ratio), the task memory's directions protected too (its stored size
        bounds what it takes)."""
        config = config or OSFTConfig()
        record = self.get(version)
        if record is None:
            return None
        layers: dict[str, list[int]] = {}
        for name, matrix in record.matrices.items():
            index = layer_index(name)
            totals = layers.setdefault("other" if index is None else str(index), [0, 0, 0, 0])
            m, memory = matrix.m, matrix.memory_directions
            shape = matrix.shape or (m, m)  # records from before shapes were stored
            k = allocate_rank(m, config.mean_protected_ratio, len(record.tasks), matrix.k, config)
            totals[0] += matrix.k
            totals[1] += m
            totals[2] += memory
            totals[3] += 0 if is_spent(m, k, config) else trainable_rank(shape, k, memory, config.memory_share)
        total_m = max(1, sum(t[1] for t in layers.values()))
        protected = sum(t[0] for t in layers.values()) / total_m
        return CapacitySummary(
            version=version,
            parent_version=record.parent_version,
            tasks=record.tasks,
            has_bases=bool(record.bases_uri),
            stored_bytes=record.stored_bytes,
            protected_fraction=round(protected, 4),
            remaining_capacity=round(sum(t[3] for t in layers.values()) / total_m, 4),
            spent_matrices=[name for name, m in record.matrices.items() if m.spent],
            task_memory_directions=sum(t[2] for t in layers.values()),
            layers={
                layer: LayerCapacity(protected_fraction=round(k / m, 4), remaining_capacity=round(room / m, 4),
                                     task_memory_directions=memory)
                for layer, (k, m, memory, room) in layers.items()
            },
        )

    def detail(self, version: str) -> RegistryVersion | None:
        """The summary of `version` plus its per-matrix records (GET /registry/{version})."""
        summary, record = self.summary(version), self.get(version)
        if summary is None:
            return None
        return RegistryVersion(**{f.name: getattr(summary, f.name) for f in dataclasses.fields(summary)},
                               matrices=record.matrices)
