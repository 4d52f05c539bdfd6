"""The object store: datasets, checkpoints and subspace bases, over fsspec.

A local directory by default (`file://...`), `s3://bucket/prefix` when configured.
Keys are relative paths made by Sculptor itself; `_resolve` refuses anything that would
step outside the store root, so no caller can read or write elsewhere.
Safetensors objects (the registry's bases and task memory) can be read tensor by tensor
(`open_tensors`): a job fetches only the matrices it trains, and from a remote store each
tensor once per machine (a local cache keyed by the object's ETag, so never a stale one).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load as load_safetensors

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


class UnsafeKey(ValueError):
    pass


BLOCK_BYTES = 1 << 20  # a remote file's read-ahead: little past the tensors a job reads


class ObjectStore:
    def __init__(self, url: str, cache_dir: Path | None = None, cache_bytes: int = 4 << 30, **storage_options):
        """`cache_dir`: where tensors read from a remote store (not `file://`) are kept, if anywhere, up to
        `cache_bytes` (the least recently read objects are dropped first)."""
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.fs.makedirs(self.root, exist_ok=True)
        self.cache_dir = cache_dir if self.protocol != "file" else None
        self.cache_bytes = cache_bytes

    def _resolve(self, key: str) -> str:
        if not _SAFE_KEY.match(key) or any(part in ("", ".", "..") for part in key.split("/")):
            raise UnsafeKey(f"refusing object key {key!r}")
        return posixpath.join(self.root, key)

    def uri(self, key: str) -> str:
        return f"{self.url}/{key}"

    def key_of(self, uri: str) -> str:
        if not uri.startswith(self.url + "/"):
            raise UnsafeKey(f"{uri!r} is not inside the object store {self.url!r}")
        return uri[len(self.url) + 1:]

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write atomically where the backend allows it: a temporary object, then a rename."""
        path = self._resolve(key)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"  # one per writer: two uploads of one dataset may race here
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, path)
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        with self.fs.open(self._resolve(key), "rb") as f:
            return f.read()

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._resolve(key))

    def size(self, key: str) -> int:
        """The object's size in bytes, as stored (FileNotFoundError when there is none)."""
        return int(self.fs.size(self._resolve(key)))

    def put_file(self, local: Path, key: str) -> str:
        path = self._resolve(key)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.put_file(str(local), path)
        return self.uri(key)

    def get_file(self, key: str, local: Path) -> Path:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._resolve(key), str(local))
        return local

    @contextmanager
    def open_tensors(self, key: str) -> Iterator[StoredTensors]:
        """A safetensors object, opened to read some of its tensors (FileNotFoundError when there is none)."""
        path = self._resolve(key)
        cache = None
        if self.cache_dir is not None:
            # One folder per object and one below it per ETag (fsspec's ukey): an object stored again (a
            # version's bases after a registry miss) gets a new one. fsspec's own blockcache is not used
            # because it merges the blocks of the old object into the new one's (fsspec 2026.9).
            tag = self.fs.ukey(path)
            cache = self._cache_of(path) / hashlib.sha256(tag.encode()).hexdigest()[:32]
            if not cache.exists() and cache.parent.exists():
                shutil.rmtree(cache.parent, ignore_errors=True)  # what an earlier ETag left
            cache.mkdir(parents=True, exist_ok=True)
            os.utime(cache.parent)  # read now: the last to be evicted
        tensors = StoredTensors(lambda: self.fs.open(path, "rb", block_size=BLOCK_BYTES), cache)
        try:
            yield tensors
        finally:
            tensors.close()
            if cache is not None:
                self._evict(keep=cache.parent)

    def _evict(self, keep: Path) -> None:
        """Drop the least recently read objects' copies until the cache is within its bytes."""
        try:
            folders = sorted((p for p in self.cache_dir.iterdir() if p != keep), key=lambda p: p.stat().st_mtime)
            sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in [keep, *folders]}
        except FileNotFoundError:
            return  # another worker's eviction is under way: housekeeping, the next read retries it
        total = sum(sizes.values())
        for folder in folders:
            if total <= self.cache_bytes:
                break
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]

    def _cache_of(self, path: str) -> Path:
        return self.cache_dir / hashlib.sha256(path.encode()).hexdigest()[:32]

    def list(self, prefix: str) -> list[str]:
        path = self._resolve(prefix)
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.find(path))

    def delete(self, prefix: str) -> None:
        path = self._resolve(prefix)
        if self.fs.exists(path):
            if self.cache_dir is not None:
                for found in self.fs.find(path):
                    shutil.rmtree(self._cache_of(found), ignore_errors=True)  # no cached copy of what is gone
            self.fs.rm(path, recursive=True)


class StoredTensors:
    """One safetensors file, read tensor by tensor (the interface of safetensors' `safe_open`: keys, metadata,
    get_tensor). Written here because `safe_open` reads local files only; the format's header (an 8-byte
    length, then JSON with each tensor's byte range) is all a ranged read needs, and each tensor's bytes are
    decoded by safetensors itself. With a `cache` folder, the header and each tensor's bytes are kept there
    and the file is opened only for what is not."""

    def __init__(self, open_file: Callable, cache: Path | None = None):
        self._open_file, self._file, self._cache = open_file, None, cache
        header = self._read("header", self._header_range)
        self._data_start = 8 + len(header)
        self._header = json.loads(header)
        self._metadata = self._header.pop("__metadata__", None)

    def keys(self) -> list[str]:
        return list(self._header)

    def metadata(self) -> dict[str, str] | None:
        return self._metadata

    def get_tensor(self, name: str) -> torch.Tensor:
        info = self._header[name]
        begin, end = info["data_offsets"]
        data = self._read(hashlib.sha256(name.encode()).hexdigest()[:32],
                          lambda f: self._range(f, self._data_start + begin, end - begin))
        header = json.dumps({name: {**info, "data_offsets": [0, end - begin]}}).encode()
        header += b" " * (-len(header) % 8)  # the format pads its header to 8 bytes
        return load_safetensors(struct.pack("<Q", len(header)) + header + data)[name]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _read(self, name: str, read: Callable) -> bytes:
        """`read(file)`'s bytes, from the cache when it has them (and kept there when it did not)."""
        cached = self._cache / name if self._cache is not None else None
        if cached is not None and cached.exists():
            try:
                return cached.read_bytes()
            except FileNotFoundError:
                pass  # evicted meanwhile by another process: read it again
        if self._file is None:
            self._file = self._open_file()
        data = read(self._file)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(f"{name}.{uuid.uuid4().hex}.partial")
            partial.write_bytes(data)
            os.replace(partial, cached)  # whole or absent, also for another process reading it
        return data

    @staticmethod
    def _header_range(f) -> bytes:
        (length,) = struct.unpack("<Q", StoredTensors._range(f, 0, 8))
        return StoredTensors._range(f, 8, length)

    @staticmethod
    def _range(f, start: int, length: int) -> bytes:
        f.seek(start)
        return f.read(length)


def open_store(settings) -> ObjectStore:
    options = {}
    if settings.store_url.startswith("s3://") and settings.s3_endpoint_url:
        options["endpoint_url"] = settings.s3_endpoint_url
    return ObjectStore(settings.store_url, cache_dir=settings.store_cache_dir, cache_bytes=settings.store_cache_bytes,
                       **options)
