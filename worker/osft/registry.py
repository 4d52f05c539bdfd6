"""The subspace registry: per model version, how much of each matrix is protected, and its bases.

Redis holds one JSON record per version under `sculptor:registry:version:<version>` and an index
(sorted set by creation time) under `sculptor:registry:index`. A record:

    {"version", "parent_version", "tasks": [task ids that shaped this version, oldest first],
     "created_at", "bases_uri": object-store URI or null,
     "matrices": {name: {"m", "shape", "k", "importance", "protected_ratio", "spent", "memory_directions"}}}

`k` is the rank protected when this version was trained: the floor for every later job.
The object store holds the bases: one safetensors file per version with the reduced SVD
(`<name>.U`, `<name>.S`, `<name>.Vh`, fp32) of every matrix that can still train, enough for any
later k. A worker loads them instead of running an SVD and recomputes them when they are missing.
The task memory (`<name>.memory`, in × r; worker/osft/memory.py) is a second file next to it: no SVD
can recompute it, so a lost bases file or record does not take it along (versions stored before it
moved keep it inside the bases file, where `load_memory` still finds it).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from sculptor.storage import ObjectStore
from worker.osft.config import OSFTConfig
from worker.osft.subspace import Bases, allocate_rank, is_spent, layer_index, trainable_rank

PREFIX = "sculptor:registry:"
INDEX_KEY = PREFIX + "index"


def _record_key(version: str) -> str:
    return f"{PREFIX}version:{version}"


def _bases_key(version: str) -> str:
    return f"registry/{version}/bases.safetensors"


def _memory_key(version: str) -> str:
    return f"registry/{version}/memory.safetensors"


class SubspaceRegistry:
    def __init__(self, redis_client, store: ObjectStore):
        self.redis = redis_client
        self.store = store

    def get(self, version: str) -> dict | None:
        raw = self.redis.get(_record_key(version))
        return json.loads(raw) if raw else None

    def put(self, record: dict) -> None:
        record.setdefault("created_at", time.time())
        pipe = self.redis.pipeline()
        pipe.set(_record_key(record["version"]), json.dumps(record))
        pipe.zadd(INDEX_KEY, {record["version"]: record["created_at"]})
        pipe.execute()

    def list_versions(self) -> list[str]:
        """Versions with a record, oldest first."""
        return list(self.redis.zrange(INDEX_KEY, 0, -1))

    def store_bases(self, version: str, bases: dict[str, Bases]) -> str:
        """Store the bases and, where any, the task memory; returns the bases' URI."""
        memory = {f"{name}.memory": b.memory.contiguous() for name, b in bases.items() if b.memory is not None}
        if memory:
            self._put(memory, _memory_key(version))
        else:
            self.store.delete(_memory_key(version))  # a stale one, should a version name come back
        return self._put({f"{name}.{part}": getattr(b, part) for name, b in bases.items() for part in ("U", "S", "Vh")},
                         _bases_key(version))

    def _put(self, tensors: dict, key: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tensors.safetensors"
            save_file(tensors, str(path))
            return self.store.put_file(path, key)

    def load_memory(self, version: str, names: list[str]) -> dict:
        """The stored task memory of those of `names` that have one (found by key: no record needed;
        the bases file holds it for versions stored before it had its own)."""
        return self._read_memory(_memory_key(version), names) or self._read_memory(_bases_key(version), names)

    def _read_memory(self, key: str, names: list[str]) -> dict:
        if not self.store.exists(key):
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            with safe_open(str(self.store.get_file(key, Path(tmp) / "memory.safetensors")), framework="pt") as f:
                stored = set(f.keys())
                return {name: f.get_tensor(f"{name}.memory") for name in names if f"{name}.memory" in stored}

    def load_bases(self, version: str, names: list[str]) -> dict[str, Bases] | None:
        """The stored bases of `names`, or None when the record, the object or any matrix is missing."""
        record = self.get(version)
        if not record or not record.get("bases_uri"):
            return None
        key = self.store.key_of(record["bases_uri"])
        if not self.store.exists(key):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = self.store.get_file(key, Path(tmp) / "bases.safetensors")
            with safe_open(str(path), framework="pt") as f:
                available = set(f.keys())
                if any(f"{name}.U" not in available for name in names):
                    return None
                bases = {name: Bases(f.get_tensor(f"{name}.U"), f.get_tensor(f"{name}.S"), f.get_tensor(f"{name}.Vh"),
                                     f.get_tensor(f"{name}.memory") if f"{name}.memory" in available else None)
                         for name in names}
        for name, memory in self._read_memory(_memory_key(version), names).items():
            bases[name].memory = memory
        return bases

    def summary(self, version: str, config: OSFTConfig | None = None) -> dict | None:
        """Capacity for the API: protected fraction (Σk / Σm) per decoder layer and overall, and the
        remaining capacity: Σ trainable rank / Σm of a next job on this version with `config` (default
        hyperparameters, uniform mean ratio), the task memory's directions protected too (its stored size
        bounds what it takes)."""
        config = config or OSFTConfig()
        record = self.get(version)
        if record is None:
            return None
        layers: dict[str, list[int]] = {}
        for name, matrix in record["matrices"].items():
            index = layer_index(name)
            totals = layers.setdefault("other" if index is None else str(index), [0, 0, 0, 0])
            m, memory = matrix["m"], matrix.get("memory_directions", 0)
            shape = matrix.get("shape") or (m, m)  # records from before shapes were stored
            k = allocate_rank(m, config.mean_protected_ratio, len(record["tasks"]), matrix["k"], config)
            totals[0] += matrix["k"]
            totals[1] += m
            totals[2] += memory
            totals[3] += 0 if is_spent(m, k, config) else trainable_rank(shape, k, memory, config.memory_share)
        total_m = max(1, sum(t[1] for t in layers.values()))
        protected = sum(t[0] for t in layers.values()) / total_m
        return {
            "version": version,
            "parent_version": record["parent_version"],
            "tasks": record["tasks"],
            "has_bases": bool(record.get("bases_uri")),
            "protected_fraction": round(protected, 4),
            "remaining_capacity": round(sum(t[3] for t in layers.values()) / total_m, 4),
            "spent_matrices": [name for name, m in record["matrices"].items() if m.get("spent")],
            # Input directions of the tasks learned so far, protected on top of the top-k (memory.py).
            "task_memory_directions": sum(t[2] for t in layers.values()),
            "layers": {
                layer: {"protected_fraction": round(k / m, 4), "remaining_capacity": round(room / m, 4),
                        "task_memory_directions": memory}
                for layer, (k, m, memory, room) in layers.items()
            },
        }

