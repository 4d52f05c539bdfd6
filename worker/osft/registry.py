"""The subspace registry: per model version, how much of each matrix is protected, and its bases.

Redis holds one JSON record per version under `sculptor:registry:version:<version>` and an index
(sorted set by creation time) under `sculptor:registry:index`. A record:

    {"version", "parent_version", "tasks": [task ids that shaped this version, oldest first],
     "created_at", "bases_uri": object-store URI or null,
     "matrices": {name: {"m", "k", "importance", "protected_ratio", "spent", "memory_directions"}}}

`k` is the rank protected when this version was trained: the floor for every later job.
The object store holds the bases: one safetensors file per version with the reduced SVD
(`<name>.U`, `<name>.S`, `<name>.Vh`, fp32) of every matrix that can still train, enough for any
later k, and its task memory (`<name>.memory`, in × r; worker/osft/memory.py). A worker loads them instead of running an SVD and recomputes them when they are missing.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from sculptor.storage import ObjectStore
from worker.osft.subspace import Bases, layer_index

PREFIX = "sculptor:registry:"
INDEX_KEY = PREFIX + "index"


def _record_key(version: str) -> str:
    return f"{PREFIX}version:{version}"


def _bases_key(version: str) -> str:
    return f"registry/{version}/bases.safetensors"


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
        tensors = {}
        for name, b in bases.items():
            tensors.update({f"{name}.U": b.U, f"{name}.S": b.S, f"{name}.Vh": b.Vh})
            if b.memory is not None:
                tensors[f"{name}.memory"] = b.memory.contiguous()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bases.safetensors"
            save_file(tensors, str(path))
            return self.store.put_file(path, _bases_key(version))

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
                return {name: Bases(f.get_tensor(f"{name}.U"), f.get_tensor(f"{name}.S"), f.get_tensor(f"{name}.Vh"),
                                    f.get_tensor(f"{name}.memory") if f"{name}.memory" in available else None)
                        for name in names}

    def summary(self, version: str) -> dict | None:
        """Capacity for the API: protected fraction (Σk / Σm) per decoder layer and overall."""
        record = self.get(version)
        if record is None:
            return None
        layers: dict[str, list[int]] = {}
        for name, matrix in record["matrices"].items():
            index = layer_index(name)
            totals = layers.setdefault("other" if index is None else str(index), [0, 0, 0])
            totals[0] += matrix["k"]
            totals[1] += matrix["m"]
            totals[2] += matrix.get("memory_directions", 0)
        protected = sum(k for k, _, _ in layers.values()) / max(1, sum(m for _, m, _ in layers.values()))
        return {
            "version": version,
            "parent_version": record["parent_version"],
            "tasks": record["tasks"],
            "has_bases": bool(record.get("bases_uri")),
            "protected_fraction": round(protected, 4),
            "remaining_capacity": round(1 - protected, 4),
            "spent_matrices": [name for name, m in record["matrices"].items() if m.get("spent")],
            # Input directions of the tasks learned so far, protected on top of the top-k (memory.py).
            "task_memory_directions": sum(memory for _, _, memory in layers.values()),
            "layers": {
                layer: {"protected_fraction": round(k / m, 4), "remaining_capacity": round(1 - k / m, 4),
                        "task_memory_directions": memory}
                for layer, (k, m, memory) in layers.items()
            },
        }

