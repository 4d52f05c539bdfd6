"""The OpenAI-compatible routes, driven by the official `openai` client over real HTTP (uvicorn)."""


import openai
import pytest
from gateway_helpers import running_gateway, tiny_settings


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path_factory.mktemp("oa"), redis_url, tiny_model_dir)
    with running_gateway(settings) as (url, _):
        yield f"{url}/v1"


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def test_models_lists_current_and_the_promoted_versions(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["current", "v0"]


def test_chat_completion(client):
    out = client.chat.completions.create(model="current", messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=5, temperature=0)
    assert out.model == "v0" and out.choices[0].message.role == "assistant"
    assert 1 <= out.usage.completion_tokens <= 5 and out.usage.prompt_tokens > 0
    raw = client.chat.completions.with_raw_response.create(
        model="v0", messages=[{"role": "user", "content": "hello"}], max_tokens=3, temperature=0)
    assert raw.headers["x-model-version"] == "v0"


def test_chat_streaming_matches_non_streaming(client):
    kwargs = dict(model="current", messages=[{"role": "user", "content": "count"}], max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole and finish in ("stop", "length")


def test_completions_and_stop(client):
    out = client.completions.create(model="current", prompt="the model", max_tokens=6, temperature=0)
    assert out.object == "text_completion" and out.choices[0].finish_reason in ("stop", "length")
    text = out.choices[0].text
    if len(text) > 2:
        stop = text[1:3]
        cut = client.completions.create(model="current", prompt="the model", max_tokens=6, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[: text.index(stop)]


def test_unknown_model_and_long_prompt(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="current", prompt="hello " * 400, max_tokens=4)
    assert "context" in err.value.body["message"]
