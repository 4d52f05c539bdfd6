"""API keys with scopes and Redis-backed rate limits, through the real gateway app."""

import pytest
from fastapi.testclient import TestClient

from sculptor.bootstrap import ensure_initial_version
from sculptor.config import ApiKey, Settings
from sculptor.context import Context
from service.api.security import digest
from service.app import create_app

KEYS = [ApiKey(name="gen", key="gen-secret", scopes=["generate"]),
        ApiKey(name="ops", key_sha256=digest("ops-secret"), scopes=["admin"])]


@pytest.fixture
def client(tmp_path, redis_url, redis_client, tiny_model_dir):
    settings = Settings(var_dir=tmp_path / "var", redis_url=redis_url, base_model_dir=str(tiny_model_dir),
                        engine="transformers", engine_dtype="float32", engine_max_model_len=256, api_keys=KEYS,
                        rate_limit_generate_per_min=3)
    ctx = Context.from_settings(settings)
    ensure_initial_version(settings, ctx.redis, ctx.store)
    with TestClient(create_app(settings)) as c:
        yield c


def auth(key):
    return {"authorization": f"Bearer {key}"}


def test_keys_and_scopes(client):
    gen = {"prompt": "hi", "max_tokens": 2}
    assert client.post("/generate", json=gen).status_code == 401
    assert client.post("/generate", json=gen, headers=auth("wrong")).json()["error"]["code"] == "invalid_api_key"
    assert client.post("/generate", json=gen, headers=auth("gen-secret")).status_code == 200
    r = client.get("/jobs", headers=auth("gen-secret"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert client.get("/jobs", headers=auth("ops-secret")).status_code == 200  # admin holds every scope
    assert client.post("/models/v0/activate", headers=auth("gen-secret")).status_code == 403
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_generation_rate_limit(client):
    codes = [client.post("/generate", json={"prompt": "hi", "max_tokens": 1}, headers=auth("gen-secret")).status_code
             for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
    r = client.post("/generate", json={"prompt": "hi", "max_tokens": 1}, headers=auth("gen-secret"))
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert client.post("/generate", json={"prompt": "hi", "max_tokens": 1}, headers=auth("ops-secret")).status_code == 200
