"""Schema-driven fuzzing of every endpoint (schemathesis over the gateway's own OpenAPI schema),
against the real gateway over HTTP: no input may produce a 5xx or leak a stack trace."""


import pytest
import schemathesis
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
