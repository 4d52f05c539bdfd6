"""Schema-driven fuzzing of every endpoint (schemathesis over the gateway's own OpenAPI schema),
against the real gateway over HTTP: no input may produce a 5xx or leak a stack trace."""


import asyncio
import json
import os
import time

import httpx
import pytest
import schemathesis
from fuzz_inputs import Case, cases
from gateway_helpers import running_gateway, tiny_settings
from hypothesis import HealthCheck, given, settings

TRIED = {"inputs": 0}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path_factory.mktemp("fuzz"), redis_url, tiny_model_dir, max_tokens_cap=8,
                             rate_limit_generate_per_min=0, rate_limit_uploads_per_min=0)
    with running_gateway(settings) as (url, _):
        yield url
    print(f"schemathesis tried {TRIED['inputs']} inputs")


def check(case) -> None:
    TRIED["inputs"] += 1
    response = case.call(timeout=30)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        assert "message" in response.json()["error"], response.text[:300]


def test_no_server_errors(base_url):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    schema.config.base_url = base_url
    operations = [op.ok() for op in schema.exclude(path_regex="events$").get_all_operations()]
    assert len(operations) >= 15  # every route of the public contract is in the schema
    for operation in operations:
        fuzz = settings(max_examples=25, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))(given(case=operation.as_strategy())(check))
        fuzz()
    assert TRIED["inputs"] >= 15 * 10


# ---------------------------------------------------------------------------------------------- structure-aware
# The generators in tests/fuzz_inputs.py start from valid requests and break them where their structure has
# joints; schemathesis above explores the schema, which knows nothing of JSONL inside a multipart file part.

FUZZ_SEED = int(os.environ.get("SCULPTOR_FUZZ_SEED", "15"))
FUZZ_INPUTS = int(os.environ.get("SCULPTOR_FUZZ_INPUTS", "3000"))
FUZZ_CONCURRENCY = 8


async def send(client: httpx.AsyncClient, case: Case) -> str | None:
    """None when the gateway answered sensibly, else what went wrong."""
    try:
        async with client.stream("POST", case.path, content=case.content(), headers=case.headers) as response:
            body = await response.aread()  # streams included: to their end
    except httpx.HTTPError as err:
        return f"dropped connection: {type(err).__name__}: {err}"
    if response.status_code >= 500:
        return f"{response.status_code}: {body[:300]!r}"
    if b"Traceback" in body:
        return f"{response.status_code} with a traceback"
    if response.status_code >= 400:
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return f"{response.status_code} without an error message: {body[:200]!r}"
        if not message:
            return f"{response.status_code} with an empty message"
    return None


async def fuzz(base_url: str, seed: int, count: int) -> tuple[list[str], dict[int, int]]:
    failures, statuses = [], {}
    gate = asyncio.Semaphore(FUZZ_CONCURRENCY)
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout could close one under a new request.
    limits = httpx.Limits(max_connections=FUZZ_CONCURRENCY, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        async def one(case: Case):
            async with gate:
                problem = await send(client, case)
                if problem:
                    failures.append(f"#{case.index} {case.what[:160]} -> {problem}")

        await asyncio.gather(*(one(case) for case in cases(seed, count)))
    return failures, statuses


def test_structure_aware_fuzz_finds_no_server_errors(base_url):
    started = time.monotonic()
    failures, _ = asyncio.run(fuzz(base_url, FUZZ_SEED, FUZZ_INPUTS))
    elapsed = time.monotonic() - started
    print(f"structure-aware fuzz: {FUZZ_INPUTS} inputs (seed {FUZZ_SEED}) in {elapsed:.1f}s")
    assert not failures, (f"{len(failures)} of {FUZZ_INPUTS} inputs (seed {FUZZ_SEED}; reproduce with "
                          f"SCULPTOR_FUZZ_SEED={FUZZ_SEED}):\n" + "\n".join(sorted(failures)[:40]))
    assert FUZZ_INPUTS >= 3000 or "SCULPTOR_FUZZ_INPUTS" in os.environ


# Inputs that answered 500 (or dropped the connection) before, each seen on a live gateway or found by the
# fuzzer above: each now answers 4xx with a message that says what to fix.
DEEP = "[" * 100_000 + "]" * 100_000
LINE = '{"prompt": "a", "completion": "b"}'


def multipart_task(extra: dict | None = None, jsonl: str = LINE, hp_as_file: bool = False):
    files = {"file": ("t.jsonl", jsonl)}
    if hp_as_file:
        files["hyperparameters"] = ("hp.json", '{"epochs": 1}', "application/json")
    return {"files": files, "data": extra or {}}


REGRESSIONS = [
    ("a deeply nested JSON body on POST /tasks", "/tasks",
     {"content": '{"name": "x", "examples": ' + DEEP + "}", "headers": {"content-type": "application/json"}},
     "too deeply"),
    ("a JSONL line of deeply nested arrays", "/tasks", multipart_task(jsonl=LINE + "\n" + DEEP), "line 2 nests"),
    ("hyperparameters sent as a multipart file part", "/tasks", multipart_task(hp_as_file=True),
     "`hyperparameters` part must be a text field"),
    ("an integer of 5000 digits", "/tasks",
     {"content": '{"name": "x", "examples": [' + "1" * 5000 + "]}", "headers": {"content-type": "application/json"}},
     "cannot be read"),
    ("a body that is not UTF-8", "/tasks",
     {"content": b'{"name": "\xff"}', "headers": {"content-type": "application/json"}}, "cannot be read"),
    ("a lone surrogate in an example", "/tasks",
     {"content": '{"name": "x", "examples": [{"prompt": "\\ud800", "completion": "b"}]}',
      "headers": {"content-type": "application/json"}}, "examples[0].prompt holds a lone UTF-16 surrogate"),
    ("a lone surrogate in a JSONL line", "/tasks", multipart_task(jsonl='{"prompt": "a\\udfff", "completion": "b"}'),
     "line 1: prompt holds a lone"),
    ("a webhook URL that does not parse", "/tasks",
     {"json": {"name": "x", "examples": [{"prompt": "a", "completion": "b"}], "webhook_url": "http://[::1"}},
     "not a valid URL"),
    ("a lone surrogate in a prompt", "/generate",
     {"content": '{"prompt": "\\ud800", "max_tokens": 1}', "headers": {"content-type": "application/json"}},
     "lone UTF-16"),
    ("a lone surrogate in a chat message", "/v1/chat/completions",
     {"content": '{"messages": [{"role": "user", "content": "a\\ud83d"}], "max_tokens": 1}',
      "headers": {"content-type": "application/json"}}, "lone UTF-16"),
    ("a seed beyond 64 bits, streamed", "/generate",
     {"json": {"prompt": "hi", "max_tokens": 1, "seed": 2**64 + 1, "stream": True}}, "seed"),
    ("a seed beyond 64 bits", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "seed": -2**63 - 1}}, "seed"),
    ("a deeply nested generation body", "/generate",
     {"content": '{"prompt": ' + DEEP + "}", "headers": {"content-type": "application/json"}}, "too deeply"),
]


@pytest.mark.parametrize("what, path, request_args, says", REGRESSIONS, ids=[r[0] for r in REGRESSIONS])
def test_inputs_that_answered_500_answer_4xx(base_url, what, path, request_args, says):
    r = httpx.post(base_url + path, timeout=30, **request_args)
    assert 400 <= r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    assert says in r.json()["error"]["message"], r.text[:300]
