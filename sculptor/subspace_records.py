"""The subspace registry's records: per model version, how much of each matrix is protected.

Redis holds one JSON record per version under `sculptor:registry:version:<version>` and an index
(sorted set by creation time) under `sculptor:registry:index`. A record:

    {"version", "parent_version", "tasks": [task ids that shaped this version, oldest first],
     "created_at", "bases_uri": object-store URI or null,
     "matrices": {name: {"m", "shape", "k", "importance", "protected_ratio", "spent", "memory_directions"}}}

`k` is the rank protected when this version was trained: the floor for every later job.
This is the registry's read side (and the record write): no torch, so the gateway serves it (GET /registry).
The bases and the task memory, tensors in the object store, are the worker's (worker/osft/registry.py:
`SubspaceRegistry` extends this class with them).
"""

from __future__ import annotations

import json
import time

from sculptor.capacity import OSFTConfig, allocate_rank, is_spent, layer_index, trainable_rank

PREFIX = "sculptor:registry:"
INDEX_KEY = PREFIX + "index"


def record_key(version: str) -> str:
    return f"{PREFIX}version:{version}"


class SubspaceRecords:
    def __init__(self, redis_client):
        self.redis = redis_client

    def get(self, version: str) -> dict | None:
        raw = self.redis.get(record_key(version))
        return json.loads(raw) if raw else None

    def put(self, record: dict) -> None:
        record.setdefault("created_at", time.time())
        pipe = self.redis.pipeline()
        pipe.set(record_key(record["version"]), json.dumps(record))
        pipe.zadd(INDEX_KEY, {record["version"]: record["created_at"]})
        pipe.execute()

    def list_versions(self) -> list[str]:
        """Versions with a record, oldest first."""
        return list(self.redis.zrange(INDEX_KEY, 0, -1))

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
