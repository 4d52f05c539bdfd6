"""Checkpoints: model versions as safetensors directories in the object store.

A write is atomic: every file goes up first, with its SHA-256 in `manifest.json`, and the
`COMMITTED` marker (holding the manifest's own digest) is written last. A reader fetches a
version into the local cache, checks the marker, every checksum and every safetensors header,
and only then renames the directory into place. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import threading
from collections import defaultdict
from contextlib import ExitStack
import json
import shutil
import struct
import tempfile
from pathlib import Path

from sculptor.storage import ObjectStore

_fetch_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

MANIFEST = "manifest.json"
MARKER = "COMMITTED"
ALLOWED_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model")


class CorruptCheckpoint(RuntimeError):
    pass


def prefix(version: str) -> str:
    return f"checkpoints/{version}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def publish_dir(store: ObjectStore, local_dir: Path, version: str) -> str:
    """Upload a saved HF model directory as `version`; returns the checkpoint URI."""
    files = sorted(p for p in local_dir.iterdir() if p.is_file() and p.name.endswith(ALLOWED_SUFFIXES))
    if not any(p.suffix == ".safetensors" for p in files):
        raise CorruptCheckpoint(f"{local_dir} holds no .safetensors weights")
    manifest = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
    store.delete(prefix(version))
    for p in files:
        store.put_file(p, f"{prefix(version)}/{p.name}")
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    store.put_bytes(f"{prefix(version)}/{MANIFEST}", manifest_bytes)
    store.put_bytes(f"{prefix(version)}/{MARKER}", hashlib.sha256(manifest_bytes).hexdigest().encode())
    return store.uri(prefix(version))


def save_model(store: ObjectStore, model, tokenizer, version: str) -> str:
    with tempfile.TemporaryDirectory(prefix=f"sculptor-{version}-") as tmp:
        model.save_pretrained(tmp)  # safetensors is the default and the only format we accept
        tokenizer.save_pretrained(tmp)
        return publish_dir(store, Path(tmp), version)


def is_committed(store: ObjectStore, version: str) -> bool:
    return store.exists(f"{prefix(version)}/{MARKER}")


def fetch(store: ObjectStore, version: str, cache_dir: Path) -> Path:
    """A verified local copy of `version` (downloaded once, then served from the cache)."""
    target = cache_dir / version
    with _fetch_locks[str(target)]:  # a prefetch and a swap may ask for the same version at once
        if (target / MARKER).exists():
            return target
        return _download(store, version, cache_dir, target)


def _download(store: ObjectStore, version: str, cache_dir: Path, target: Path) -> Path:
    if not is_committed(store, version):
        raise CorruptCheckpoint(f"checkpoint {version} has no commit marker: it was never fully written")
    manifest_bytes = store.get_bytes(f"{prefix(version)}/{MANIFEST}")
    marker = store.get_bytes(f"{prefix(version)}/{MARKER}").decode().strip()
    if hashlib.sha256(manifest_bytes).hexdigest() != marker:
        raise CorruptCheckpoint(f"checkpoint {version}: manifest does not match its commit marker")
    manifest = json.loads(manifest_bytes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache_dir))
    try:
        for name, meta in manifest.items():
            if "/" in name or not name.endswith(ALLOWED_SUFFIXES):
                raise CorruptCheckpoint(f"checkpoint {version}: unexpected file {name!r}")
            local = store.get_file(f"{prefix(version)}/{name}", tmp / name)
            if sha256_file(local) != meta["sha256"]:
                raise CorruptCheckpoint(f"checkpoint {version}: checksum mismatch in {name}")
            if name.endswith(".safetensors"):
                check_safetensors_header(local)
        (tmp / MARKER).write_text(marker)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tensor_layout(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, read from the safetensors headers alone."""
    layout = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        header = check_safetensors_header(path)
        layout.update({k: t["shape"] for k, t in header.items() if k != "__metadata__"})
    return layout


def check_same_layout(new_dir: Path, serving_dir: Path) -> None:
    """A version can replace the serving one in place only if every tensor keeps its name and shape."""
    new, old = tensor_layout(new_dir), tensor_layout(serving_dir)
    if new != old:
        missing = sorted(set(old) - set(new))[:3]
        extra = sorted(set(new) - set(old))[:3]
        reshaped = sorted(k for k in set(new) & set(old) if new[k] != old[k])[:3]
        raise CorruptCheckpoint(f"{new_dir.name} does not fit the serving model's architecture "
                                f"(missing {missing}, unexpected {extra}, reshaped {reshaped})")


def changed_tensors(new_dir: Path, old_dir: Path) -> set[str]:
    """Names of the tensors whose values differ between two checkpoints of the same layout.

    Why: a swap reloads only these. A constrained job leaves the embeddings and norms alone
    (a fifth of SmolLM2's weights, a third of its layers), and on vLLM's CPU backend the
    reload is the whole stall of a one-replica swap: 0.33 s for all tensors, 0.24 s for the
    changed ones, measured on an AMX Xeon.
    """
    from safetensors import safe_open

    with ExitStack() as stack:
        old = {}
        for path in sorted(old_dir.glob("*.safetensors")):
            handle = stack.enter_context(safe_open(path, "pt"))
            old.update({name: handle for name in handle.keys()})
        changed = set()
        for path in sorted(new_dir.glob("*.safetensors")):
            new = stack.enter_context(safe_open(path, "pt"))
            changed.update(name for name in new.keys()
                           if name not in old or not new.get_tensor(name).equal(old[name].get_tensor(name)))
        return changed


def check_safetensors_header(path: Path) -> dict:
    """The header must be JSON describing tensors that exactly tile the file's data section."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CorruptCheckpoint(f"{path.name}: too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100 << 20):
            raise CorruptCheckpoint(f"{path.name}: implausible safetensors header length")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise CorruptCheckpoint(f"{path.name}: safetensors header is not JSON") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise CorruptCheckpoint(f"{path.name}: data section does not match the header (truncated?)")
    return header
