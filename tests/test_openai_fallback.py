"""The /v1 routes on the transformers engine (where vLLM cannot run): what it can honour is answered,
and what it cannot is refused with 400 `unsupported_parameter` naming the parameter, never dropped."""

import httpx
import openai
import pytest
from gateway_helpers import running_gateway, tiny_settings

HELLO = [{"role": "user", "content": "hello world"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url, tiny_model_dir):
    with running_gateway(tiny_settings(tmp_path_factory.mktemp("fallback"), redis_url, tiny_model_dir)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=60)


def test_content_parts_and_the_developer_role_are_answered(client):
    answer = client.chat.completions.create(model="current", max_tokens=4, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    assert answer.model == "v0" and isinstance(answer.choices[0].message.content, str)


@pytest.mark.parametrize("param, extra", [
    ("tools", {"tools": [TOOL]}),
    ("tool_choice", {"tools": [], "tool_choice": "required"}),
    ("logprobs", {"logprobs": True, "top_logprobs": 2}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("n", {"n": 2}),
])
def test_chat_parameters_it_cannot_honour_are_refused_by_name(client, param, extra):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="current", messages=HELLO, max_tokens=2, **extra)
    assert err.value.code == "unsupported_parameter" and f"'{param}'" in err.value.message


@pytest.mark.parametrize("param, extra", [("echo", {"echo": True}), ("logprobs", {"logprobs": 2}),
                                          ("prompt", {"prompt": ["one", "two"]})])
def test_completion_parameters_it_cannot_honour_are_refused_by_name(client, param, extra):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="current", max_tokens=2, **{"prompt": "hello", **extra})
    assert err.value.code == "unsupported_parameter" and f"'{param}'" in err.value.message


def test_a_version_it_does_not_hold_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="v9", messages=HELLO, max_tokens=2)
    assert err.value.code == "model_not_found"


def test_tokenize_says_it_needs_vllm(gateway):
    response = httpx.post(f"{gateway}/tokenize", json={"prompt": "hello"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_route"
