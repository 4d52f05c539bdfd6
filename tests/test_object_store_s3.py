"""The object store on S3: moto's S3 server on loopback stands in for MinIO / AWS.

Everything goes through sculptor.storage.ObjectStore over s3fs, and the bucket's contents are read back
with boto3 directly, so the keys other S3 tools (mc, aws s3, the console) see are checked too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from moto.server import ThreadedMotoServer
from safetensors.torch import load_file, save_file

from sculptor.config import Settings
from sculptor.storage import ObjectStore, UnsafeKey, open_store

BUCKET = "sculptor-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3(s3_endpoint):
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def store(s3_endpoint, request):
    # A prefix per test: tests share the bucket but not their keys.
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.originalname)
    return ObjectStore(f"s3://{BUCKET}/{name}-{digest}", endpoint_url=s3_endpoint)


def bucket_keys(s3, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def test_bytes_round_trip(store, s3):
    prefix = store.root.split("/", 1)[1]
    uri = store.put_bytes("datasets/t1/train.jsonl", b'{"prompt": "a", "completion": "b"}\n')
    assert uri == f"s3://{BUCKET}/{prefix}/datasets/t1/train.jsonl"
    assert store.key_of(uri) == "datasets/t1/train.jsonl"
    assert store.get_bytes("datasets/t1/train.jsonl") == b'{"prompt": "a", "completion": "b"}\n'
    assert store.exists("datasets/t1/train.jsonl")
    assert not store.exists("datasets/t1/eval.jsonl")
    # Overwrite replaces; the temporary ".partial" object of the atomic write is gone.
    store.put_bytes("datasets/t1/train.jsonl", b"v2")
    assert store.get_bytes("datasets/t1/train.jsonl") == b"v2"
    assert bucket_keys(s3, prefix + "/") == [f"{prefix}/datasets/t1/train.jsonl"]
    # Binary payloads survive unchanged.
    blob = bytes(range(256)) * 4096
    store.put_bytes("blobs/all-bytes.bin", blob)
    assert store.get_bytes("blobs/all-bytes.bin") == blob


def test_missing_key_raises(store):
    with pytest.raises(FileNotFoundError):
        store.get_bytes("nothing/here.json")
    with pytest.raises(FileNotFoundError):
        store.size("nothing/here.json")


def test_size_is_the_objects_bytes_in_the_bucket(store, s3):
    store.put_bytes("registry/v1/memory.safetensors", b"x" * 1234)
    key = f"{store.root.split('/', 1)[1]}/registry/v1/memory.safetensors"
    assert store.size("registry/v1/memory.safetensors") == 1234
    assert s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == 1234


def test_files_list_and_delete(store, s3, tmp_path):
    prefix = store.root.split("/", 1)[1]
    for name, content in {"a.txt": b"a", "sub/b.txt": b"bb", "sub/deeper/c.txt": b"ccc"}.items():
        local = tmp_path / "up" / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(content)
        assert store.put_file(local, f"jobs/j1/{name}") == store.uri(f"jobs/j1/{name}")
    store.put_bytes("jobs/j2/other.txt", b"x")

    assert store.list("jobs/j1") == ["jobs/j1/a.txt", "jobs/j1/sub/b.txt", "jobs/j1/sub/deeper/c.txt"]
    assert store.list("jobs/j1/sub/deeper") == ["jobs/j1/sub/deeper/c.txt"]
    assert store.list("jobs/none") == []

    got = store.get_file("jobs/j1/sub/deeper/c.txt", tmp_path / "down" / "nested" / "c.txt")
    assert got.read_bytes() == b"ccc"

    store.delete("jobs/j1")
    assert store.list("jobs/j1") == []
    assert not store.exists("jobs/j1/a.txt")
    assert store.list("jobs/j2") == ["jobs/j2/other.txt"], "deleting one prefix leaves its siblings"
    assert bucket_keys(s3, prefix + "/") == [f"{prefix}/jobs/j2/other.txt"]
    store.delete("jobs/j1")  # deleting what is already gone is not an error


def test_safetensors_checkpoint_directory_round_trip(store, s3, tmp_path):
    """A checkpoint-like directory (weights, config, tokenizer) up and down again, bit for bit."""
    prefix = store.root.split("/", 1)[1]
    src = tmp_path / "v1"
    src.mkdir()
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 128, generator=generator),
        "model.layers.0.mlp.down_proj.weight": torch.randn(128, 256, generator=generator).to(torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(100, 128, generator=generator),
    }
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt", "version": "v1"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    (src / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))

    for path in sorted(src.rglob("*")):
        store.put_file(path, f"checkpoints/v1/{path.relative_to(src).as_posix()}")
    keys = store.list("checkpoints/v1")
    assert keys == ["checkpoints/v1/config.json", "checkpoints/v1/model.safetensors", "checkpoints/v1/tokenizer.json"]
    assert bucket_keys(s3, f"{prefix}/checkpoints/") == [f"{prefix}/{k}" for k in keys]

    dst = tmp_path / "cache" / "v1"
    for key in keys:
        store.get_file(key, dst / key.rsplit("/", 1)[1])
    loaded = load_file(dst / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    assert (dst / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert json.loads((dst / "config.json").read_text())["hidden_size"] == 128


def test_tensors_are_read_by_range_and_cached_locally(s3_endpoint, tmp_path, monkeypatch):
    """A job reads only the matrices it trains, each once per machine, and never a stale copy."""
    import s3fs

    store = ObjectStore(f"s3://{BUCKET}/ranged", cache_dir=tmp_path / "cache", endpoint_url=s3_endpoint)
    generator = torch.Generator().manual_seed(0)
    tensors = {f"m{i}.U": torch.randn(1024, 1024, generator=generator) for i in range(4)}  # 4 MiB each
    save_file(tensors, tmp_path / "bases.safetensors", metadata={"memory_keys": "{}"})
    store.put_file(tmp_path / "bases.safetensors", "registry/v1/bases.safetensors")
    fetched = []  # the bytes of each ranged GET
    fetch = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range",
                        lambda self, start, end: fetched.append(end - start) or fetch(self, start, end))

    with store.open_tensors("registry/v1/bases.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata() == {"memory_keys": "{}"}
        assert torch.equal(f.get_tensor("m2.U"), tensors["m2.U"])
    total = store.size("registry/v1/bases.safetensors")
    assert 4 << 20 < sum(fetched) <= 8 << 20 < total  # the header and one matrix (and 1 MiB read-ahead each)
    fetched.clear()
    with store.open_tensors("registry/v1/bases.safetensors") as f:
        assert torch.equal(f.get_tensor("m2.U"), tensors["m2.U"])
    assert fetched == []  # from the local cache

    # Stored again (a registry miss recomputes a version's bases): the cached copy is not used.
    changed = {name: -t for name, t in tensors.items()}
    save_file(changed, tmp_path / "bases.safetensors")
    store.put_file(tmp_path / "bases.safetensors", "registry/v1/bases.safetensors")
    with store.open_tensors("registry/v1/bases.safetensors") as f:
        assert torch.equal(f.get_tensor("m2.U"), changed["m2.U"])
    assert fetched
    store.delete("registry/v1")  # pruned: its cached copy leaves the disk too
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(FileNotFoundError):
        with store.open_tensors("registry/v1/bases.safetensors"):
            pass


def test_the_cache_keeps_the_most_recently_read_objects_within_its_bytes(s3_endpoint, tmp_path):
    store = ObjectStore(f"s3://{BUCKET}/evicted", cache_dir=tmp_path / "cache", cache_bytes=6 << 20,
                        endpoint_url=s3_endpoint)
    matrix = torch.randn(1024, 1024)  # 4 MiB
    for version in ("v1", "v2"):
        save_file({"m.U": matrix}, tmp_path / "bases.safetensors")
        store.put_file(tmp_path / "bases.safetensors", f"registry/{version}/bases.safetensors")

    def cached_mb() -> float:
        return sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*") if f.is_file()) / (1 << 20)

    for version in ("v1", "v2", "v1"):
        with store.open_tensors(f"registry/{version}/bases.safetensors") as f:
            assert torch.equal(f.get_tensor("m.U"), matrix)
        assert len(list((tmp_path / "cache").iterdir())) == 1 and 4 <= cached_mb() <= 6  # the one just read

    settings = Settings(object_store_url=f"s3://{BUCKET}/x", s3_endpoint_url=s3_endpoint, var_dir=tmp_path / "var",
                        store_cache_bytes=123)
    opened = open_store(settings)
    assert opened.cache_bytes == 123 and opened.cache_dir == tmp_path / "var" / "cache" / "store"


def test_open_store_uses_the_configured_endpoint(s3_endpoint, s3, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no stray .env
    settings = Settings(object_store_url=f"s3://{BUCKET}/from-settings", s3_endpoint_url=s3_endpoint,
                        var_dir=tmp_path / "var")
    store = open_store(settings)
    assert store.protocol == "s3"
    store.put_bytes("registry/v0/bases.json", b"{}")
    assert bucket_keys(s3, "from-settings/") == ["from-settings/registry/v0/bases.json"]
    assert not (tmp_path / "var").exists(), "an S3 store writes nothing locally"


UNSAFE_KEYS = [
    "../escape",
    "a/../../escape",
    "a/..",
    "..",
    ".",
    "./a",
    "a/./b",
    "/etc/passwd",
    "/absolute",
    "",
    "a//b",
    "a/b/",
    "a\\..\\b",
    "s3://other-bucket/x",
    "a/b c",
    "a\x00b",
]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused(store, s3, tmp_path, key):
    before = bucket_keys(s3)
    local = tmp_path / "payload"
    local.write_bytes(b"payload")
    operations = [
        lambda: store.put_bytes(key, b"payload"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.put_file(local, key),
        lambda: store.get_file(key, tmp_path / "out"),
        lambda: store.list(key),
        lambda: store.delete(key),
    ]
    for operation in operations:
        with pytest.raises(UnsafeKey):
            operation()
    assert bucket_keys(s3) == before, "a refused key writes nothing"
    assert not (tmp_path / "out").exists()


def test_uris_outside_the_store_are_refused(store):
    with pytest.raises(UnsafeKey):
        store.key_of("s3://other-bucket/x")
    with pytest.raises(UnsafeKey):
        store.key_of(store.url + "-sibling/x")  # a prefix that merely starts with the store's name
    assert store.key_of(store.uri("a/b")) == "a/b"


def test_a_refused_delete_leaves_the_bucket_alone(store, s3):
    """Deleting with an escaping key must not touch other prefixes or other users of the bucket."""
    s3.put_object(Bucket=BUCKET, Key="someone-else/keep.txt", Body=b"keep")
    store.put_bytes("mine.txt", b"mine")
    for key in ("..", "../someone-else", "/"):
        with pytest.raises(UnsafeKey):
            store.delete(key)
    assert s3.get_object(Bucket=BUCKET, Key="someone-else/keep.txt")["Body"].read() == b"keep"
    assert store.get_bytes("mine.txt") == b"mine"


def test_compose_bootstrap_publishes_v0_to_s3(s3_endpoint, s3, redis_url, redis_client, tiny_model_dir, tmp_path):
    """docker-compose's bootstrap command against S3: the base model lands in the bucket as checkpoint v0."""
    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())
    command = compose["services"]["bootstrap"]["command"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCULPTOR_") and k != "REDIS_URL"}
    env.update(REDIS_URL=redis_url, SCULPTOR_OBJECT_STORE_URL=f"s3://{BUCKET}/compose-store",
               SCULPTOR_S3_ENDPOINT_URL=s3_endpoint, SCULPTOR_VAR_DIR=str(tmp_path / "var"),
               SCULPTOR_BASE_MODEL_DIR=str(tiny_model_dir))
    result = subprocess.run([sys.executable, *command[1:]], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "serving version v0" in result.stdout
    keys = bucket_keys(s3, "compose-store/checkpoints/v0/")
    assert "compose-store/checkpoints/v0/model.safetensors" in keys
    assert "compose-store/checkpoints/v0/config.json" in keys
    # What was uploaded is the base model, byte for byte.
    body = s3.get_object(Bucket=BUCKET, Key="compose-store/checkpoints/v0/model.safetensors")["Body"].read()
    assert body == (tiny_model_dir / "model.safetensors").read_bytes()
