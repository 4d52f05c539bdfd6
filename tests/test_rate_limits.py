"""Rate limits belong to keys (issue 15, item 8): none on an open gateway by default; a token bucket per key
in Redis with Retry-After; a per-key limit on generation requests in flight. Real gateway, real Redis."""

import time

import httpx
import pytest
import redis
from gateway_helpers import running_gateway, tiny_settings

from sculptor.config import ApiKey
from sculptor.redis_server import free_port
from service.api.errors import ApiError
from service.api.limits import RateLimiter, concurrency_limit

KEYS = [ApiKey(name="app", key="app-secret", scopes=["generate"]),
        ApiKey(name="other", key="other-secret", scopes=["generate"])]
SHORT = {"prompt": "hi", "max_tokens": 1}


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def test_an_open_gateway_does_not_rate_limit_its_clients(tmp_path, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path / "var", redis_url, tiny_model_dir, rate_limit_generate_per_min=3)
    with running_gateway(settings) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        codes = [client.post("/generate", json=SHORT).status_code for _ in range(8)]
    assert codes == [200] * 8


def test_a_key_gets_a_bucket_of_its_minute_then_the_rate(tmp_path, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path / "var", redis_url, tiny_model_dir, api_keys=KEYS, rate_limit_generate_per_min=3)
    with running_gateway(settings) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        codes = [client.post("/generate", json=SHORT, headers=auth("app-secret")).status_code for _ in range(3)]
        refused = client.post("/generate", json=SHORT, headers=auth("app-secret"))
        other = client.post("/generate", json=SHORT, headers=auth("other-secret"))
    assert codes == [200, 200, 200] and other.status_code == 200, "each key has its own bucket"
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    # 3 a minute refill one request every 20 s: the wait is for the next token, not for a window's end
    assert 17 <= int(refused.headers["retry-after"]) <= 20, refused.headers
    assert "'app'" in refused.json()["error"]["message"]


def test_the_bucket_refills_at_the_rate_without_a_second_burst(redis_client):
    limiter = RateLimiter(redis_client)
    for _ in range(60):
        limiter.check("generate", "k", per_minute=60)  # a minute's allowance at once
    with pytest.raises(ApiError) as refused:
        limiter.check("generate", "k", per_minute=60)
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    time.sleep(1.1)  # one token back (60 a minute), not a fresh minute's worth
    limiter.check("generate", "k", per_minute=60)
    with pytest.raises(ApiError):
        limiter.check("generate", "k", per_minute=60)
    limiter.check("generate", "k", per_minute=0)  # 0: unlimited


def test_requests_pass_while_redis_is_away():
    away = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    RateLimiter(away).check("generate", "k", per_minute=1)
    RateLimiter(away).check("generate", "k", per_minute=1)


def test_concurrency_defaults():
    assert concurrency_limit(None, open_gateway=True) == 0
    assert concurrency_limit(None, open_gateway=False) == 64
    assert concurrency_limit(3, open_gateway=True) == 3


def test_a_key_over_its_concurrent_requests_gets_429(tmp_path, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path / "var", redis_url, tiny_model_dir, api_keys=KEYS, max_concurrent_per_key=1,
                             engine_max_model_len=1024)
    long = {"prompt": "the model learns", "max_tokens": 1000, "stream": True}
    with running_gateway(settings) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/generate", json=long, headers=auth("app-secret")) as streaming:
            lines = streaming.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # generating
            busy = client.post("/generate", json=SHORT, headers=auth("app-secret"))
            # another key is not held back by this one's limit (max_tokens over the cap: it got past the limits)
            other = client.post("/generate", json={**SHORT, "max_tokens": 5000}, headers=auth("other-secret"))
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "too_many_concurrent_requests"
        assert busy.headers["retry-after"] == "1" and "SCULPTOR_MAX_CONCURRENT_PER_KEY" in busy.text
        assert other.json()["error"]["code"] == "max_tokens_too_large"
        deadline = time.monotonic() + 20  # the stream was closed: its slot comes back once the answer has ended
        while (again := client.post("/generate", json=SHORT, headers=auth("app-secret"))).status_code == 429:
            assert time.monotonic() < deadline, "the slot was not released after the client went away"
            time.sleep(0.1)
        assert again.status_code == 200
