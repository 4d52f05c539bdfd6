"""The object store: datasets, checkpoints and subspace bases, over fsspec.

A local directory by default (`file://...`), `s3://bucket/prefix` when configured.
Keys are relative paths made by Sculptor itself; `_resolve` refuses anything that would
step outside the store root, so no caller can read or write elsewhere.
"""

from __future__ import annotations

import posixpath
import re
import uuid
from pathlib import Path

import fsspec

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


class UnsafeKey(ValueError):
    pass


class ObjectStore:
    def __init__(self, url: str, **storage_options):
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.fs.makedirs(self.root, exist_ok=True)

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

    def list(self, prefix: str) -> list[str]:
        path = self._resolve(prefix)
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.find(path))

    def delete(self, prefix: str) -> None:
        path = self._resolve(prefix)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def open_store(settings) -> ObjectStore:
    options = {}
    if settings.store_url.startswith("s3://") and settings.s3_endpoint_url:
        options["endpoint_url"] = settings.s3_endpoint_url
    return ObjectStore(settings.store_url, **options)
