"""The gateway keeps serving while Redis is away, reports not-ready, and recovers when it returns."""

import pytest
from fastapi.testclient import TestClient

from sculptor import redis_server
from sculptor.bootstrap import ensure_initial_version
from sculptor.config import Settings
from sculptor.context import Context
from service.app import create_app


@pytest.fixture
def redis_proc(tmp_path):
    port = redis_server.free_port()
    proc, url = redis_server.start_redis(tmp_path / "redis", port)
    state = {"proc": proc, "url": url, "port": port, "dir": tmp_path / "redis"}
    yield state
    redis_server.stop(state["proc"])


def test_serving_survives_a_redis_outage(tmp_path, redis_proc, tiny_model_dir):
    settings = Settings(var_dir=tmp_path / "var", redis_url=redis_proc["url"], base_model_dir=str(tiny_model_dir),
                        engine="transformers", engine_dtype="float32", engine_max_model_len=256)
    ctx = Context.from_settings(settings)
    ensure_initial_version(settings, ctx.redis, ctx.store)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        redis_server.stop(redis_proc["proc"])

        r = client.post("/generate", json={"prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model_version"] == "v0"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False
        upload = client.post("/tasks", json={"name": "x", "examples": [
            {"prompt": "a", "completion": "b"}]})
        assert upload.status_code == 503 and "error" in upload.json()

        redis_proc["proc"], _ = redis_server.start_redis(redis_proc["dir"], redis_proc["port"])
        assert client.get("/readyz").status_code == 200
        assert client.get("/models").json()["current"] == "v0"  # the lineage survived the restart (AOF)
