"""The subspace registry: per model version, how much of each matrix is protected, and its bases.

The records (Redis: one JSON record per version and an index, described in sculptor/subspace_records.py,
which the gateway reads) say how much is protected. The object store holds the bases: one safetensors
file per version with the reduced SVD (`<name>.U`, `<name>.S`, `<name>.Vh`, fp32) of every matrix that
can still train, enough for any later k. A worker loads them instead of running an SVD and recomputes
them when they are missing.
The task memory (`<name>.memory`, in × r; worker/osft/memory.py) is a second file next to it: no SVD
can recompute it, so a lost bases file or record does not take it along (versions stored before it
moved keep it inside the bases file, where `load_memory` still finds it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from sculptor.storage import ObjectStore
from sculptor.subspace_records import SubspaceRecords
from worker.osft.subspace import Bases


def _bases_key(version: str) -> str:
    return f"registry/{version}/bases.safetensors"


def _memory_key(version: str) -> str:
    return f"registry/{version}/memory.safetensors"


class SubspaceRegistry(SubspaceRecords):
    """The records (get, put, list_versions, summary: SubspaceRecords) and the tensors behind them."""

    def __init__(self, redis_client, store: ObjectStore):
        super().__init__(redis_client)
        self.store = store

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
        if not record or not record.bases_uri:
            return None
        key = self.store.key_of(record.bases_uri)
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
