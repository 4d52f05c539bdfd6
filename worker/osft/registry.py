"""The subspace registry: per model version, how much of each matrix is protected, and its bases.

The records (Redis: one JSON record per version and an index, described in sculptor/subspace_records.py,
which the gateway reads) say how much is protected. The object store holds the bases: one safetensors
file per version with, for every matrix that can still train, its singular values `<name>.S` and the
singular vectors of one side, the square one (`<name>.U` or `<name>.Vh`, fp32; subspace.stored_side). A
worker reads those of the matrices it trains (ObjectStore.open_tensors: ranged reads, cached locally from a
remote store), loads them with the version's weights, rebuilds the other side's top k from them
(subspace.from_stored_side) instead of running an SVD, and recomputes them when they are missing. For
SmolLM2 that is 208 MB, a third of the whole SVD's 633 MB. Files from before this hold both sides and still load.
The task memory (in × r per matrix; worker/osft/memory.py) is a second file next to it: no SVD
can recompute it, so a lost or pruned bases file or record does not take it along (versions stored before
it moved keep it inside the bases file, where `load_memory` still finds it). Matrices that see the same
inputs (a layer's q/k/v, and gate/up) have equal memories: each distinct one is stored once, under its
first matrix's `<name>.memory`, and the file's metadata maps every matrix to its tensor (files written
before that hold one `<name>.memory` per matrix, no map). A memory is stored as fp16 directions and fp32
column norms (`<name>.memory.norms`; `_half_precision`), half the bytes of fp32; older fp32 files still load.
Only some versions keep their bases (`prune_bases`, after each job: SCULPTOR_REGISTRY_KEEP_BASES); the
memory is never pruned.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from sculptor.storage import ObjectStore
from sculptor.subspace_records import SubspaceRecord, SubspaceRecords
from worker.osft.subspace import Bases, from_stored_side, stored_side

MEMORY_KEYS = "memory_keys"  # safetensors metadata: JSON {matrix name: key of the tensor holding its memory}


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
        memory = {name: b.memory for name, b in bases.items() if b.memory is not None}
        if memory:
            self._put_memory(memory, version)
        else:
            self.store.delete(_memory_key(version))  # a stale one, should a version name come back
        tensors = {}
        for name, b in bases.items():
            side = stored_side((b.U.shape[0], b.Vh.shape[1]))
            tensors |= {f"{name}.S": b.S, f"{name}.{side}": getattr(b, side)}
        return self._put(tensors, _bases_key(version))

    def _put_memory(self, memory: dict[str, torch.Tensor], version: str) -> None:
        tensors, keys = distinct_memory(memory)
        encoded = {}
        for key, factor in tensors.items():
            encoded |= _half_precision(key, factor)
        self._put(encoded, _memory_key(version), metadata={MEMORY_KEYS: json.dumps(keys)})

    def _put(self, tensors: dict, key: str, metadata: dict[str, str] | None = None) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tensors.safetensors"
            save_file(tensors, str(path), metadata=metadata)
            return self.store.put_file(path, key)

    def stored_bytes(self, version: str) -> int:
        """What `version`'s bases and task memory take in the object store."""
        return sum(self.store.size(key) for key in (_bases_key(version), _memory_key(version))
                   if self.store.exists(key))

    def load_memory(self, version: str, names: list[str]) -> dict:
        """The stored task memory of those of `names` that have one (found by key: no record needed;
        the bases file holds it for versions stored before it had its own)."""
        return self._read_memory(_memory_key(version), names) or self._read_memory(_bases_key(version), names)

    def _read_memory(self, key: str, names: list[str]) -> dict:
        if not self.store.exists(key):
            return {}
        with self.store.open_tensors(key) as f:
            return _memory_in(f, names)

    def load_bases(self, version: str, weights: dict[str, torch.Tensor], ranks: dict[str, int]) -> dict[str, Bases] | None:
        """The stored bases of the matrices in `ranks`, each with the side the registry does not store rebuilt
        up to its rank k there from `weights` (that version's, by matrix name, on the job's device); None when
        the record, the object or any matrix is missing, or a side cannot be rebuilt exactly
        (subspace.from_stored_side)."""
        stored = self.load_stored(version, list(ranks))
        if stored is None:
            return None
        bases = {name: _bases_from(parts, weights[name], ranks[name]) for name, parts in stored.items()}
        if any(b is None for b in bases.values()):
            return None
        for name, b in bases.items():
            b.memory = stored[name].get("memory")
        return bases

    def load_stored(self, version: str, names: list[str]) -> dict[str, dict[str, torch.Tensor]] | None:
        """The tensors stored for `names` (each: "S", "U" and/or "Vh", "memory" where it has one), on the CPU;
        None when the record, the object or any matrix's bases are missing."""
        record = self.get(version)
        if not record or not record.bases_uri:
            return None
        key = self.store.key_of(record.bases_uri)
        if not self.store.exists(key):
            return None
        with self.store.open_tensors(key) as f:  # only the matrices asked for are read
            available = set(f.keys())
            if any(f"{name}.S" not in available for name in names):
                return None
            stored = {name: {part: f.get_tensor(f"{name}.{part}") for part in ("S", "U", "Vh")
                             if f"{name}.{part}" in available} for name in names}
            memory = _memory_in(f, names)  # versions stored before the memory had its own file
        memory.update(self._read_memory(_memory_key(version), names))
        for name, factor in memory.items():
            stored[name]["memory"] = factor
        return stored

    def prune_bases(self, keep: set[str]) -> list[str]:
        """Delete the bases of every version not in `keep` (an SVD of its checkpoint recomputes them when a
        job trains on it again), keeping its task memory; returns the versions pruned, oldest first.
        Their records keep no bases_uri, so `load_bases` misses and the next job on one stores them again."""
        pruned = []
        for version in self.list_versions():
            record = self.get(version)
            if version in keep or record is None or not record.bases_uri:
                continue
            self._move_memory_out_of_bases(record)
            self.store.delete(_bases_key(version))
            self.put(dataclasses.replace(record, bases_uri=None, stored_bytes=self.stored_bytes(version)))
            pruned.append(version)
        return pruned

    def _move_memory_out_of_bases(self, record: SubspaceRecord) -> None:
        """A version stored before the memory had its own file keeps it in the bases file: save it apart
        before that file goes."""
        has_memory = any(m.memory_directions for m in record.matrices.values())
        if not has_memory or self.store.exists(_memory_key(record.version)):
            return
        memory = self._read_memory(_bases_key(record.version), list(record.matrices))
        if memory:
            self._put_memory(memory, record.version)


def distinct_memory(memory: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct memory tensor once, under the key of the first matrix that has it, and every matrix's
    key. Exact equality only: merging merely close memories would change what a later job protects."""
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[str, str] = {}
    by_fingerprint: dict[tuple, list[str]] = {}
    for name, factor in memory.items():
        # A cheap fingerprint, so that only tensors that may be equal are compared element by element.
        candidates = by_fingerprint.setdefault((tuple(factor.shape), factor.dtype, float(factor.sum())), [])
        key = next((k for k in candidates if torch.equal(tensors[k], factor)), None)
        if key is None:
            key = f"{name}.memory"
            tensors[key] = factor.contiguous()
            candidates.append(key)
        keys[name] = key
    return tensors, keys


def _bases_from(stored: dict[str, torch.Tensor], weight: torch.Tensor, k: int) -> Bases | None:
    """One matrix's bases: both sides as stored (files from before one side was stored), or the stored side
    with the other rebuilt up to k from `weight`; None when that cannot be done."""
    if "U" in stored and "Vh" in stored:
        return Bases(stored["U"], stored["S"], stored["Vh"])
    side = stored_side(tuple(weight.shape))
    if side not in stored:
        return None
    return from_stored_side(stored[side], side, stored["S"], weight, k)


def _half_precision(key: str, factor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A memory factor as stored: its columns' directions in fp16 under `key`, their norms in fp32 under
    `key.norms` (half the bytes of fp32). Each job orthonormalises the memory again by an SVD before it protects
    any of it (memory.protected_directions), so only the directions' rounding matters: at most 2⁻¹¹ of an
    entry, which tilts a direction by under 1e-3."""
    norms = factor.norm(dim=0)
    return {key: (factor / norms.clamp(min=torch.finfo(factor.dtype).tiny)).half(), f"{key}.norms": norms}


def _memory_in(f, names: list[str]) -> dict[str, torch.Tensor]:
    """The memory (fp32) of those of `names` that the open safetensors file `f` holds."""
    keys = json.loads((f.metadata() or {}).get(MEMORY_KEYS, "{}"))
    available = set(f.keys())
    found = {name: keys.get(name, f"{name}.memory") for name in names}  # no map: one key per matrix
    tensors = {key: _full_precision(f, key, available) for key in set(found.values()) if key in available}
    return {name: tensors[key] for name, key in found.items() if key in tensors}


def _full_precision(f, key: str, available: set[str]) -> torch.Tensor:
    """A stored memory factor back in fp32 (files from before the fp16 directions hold it in fp32, no norms)."""
    factor = f.get_tensor(key)
    norms = f"{key}.norms"
    return factor.float() * f.get_tensor(norms) if norms in available else factor
