"""Work bounds on what one request may ask (issue 15, item 7): eval examples and messages per example at
upload; prompt bytes, messages and stop sequences on the generation routes. Through the real gateway (HTTP)."""

import httpx
import pytest
from gateway_helpers import running_gateway, tiny_settings

from sculptor.config import Settings
from service.generation import MAX_STOP_CHARS, MAX_STOP_SEQUENCES

PROMPT_BYTES, CHAT_MESSAGES, EVAL_EXAMPLES, EXAMPLE_MESSAGES = 64, 4, 3, 4


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path_factory.mktemp("bounds") / "var", redis_url, tiny_model_dir,
                             max_prompt_bytes=PROMPT_BYTES, max_chat_messages=CHAT_MESSAGES,
                             max_eval_examples=EVAL_EXAMPLES, max_example_messages=EXAMPLE_MESSAGES)
    with running_gateway(settings) as (url, ctx):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, ctx


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def chat(n: int, text: str = "hi") -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i in range(n - 1, -1, -1)]


def test_defaults():
    settings = Settings()
    assert settings.max_eval_examples == 2000 and settings.max_example_messages == 64
    assert settings.max_prompt_bytes == 256 * 1024 and settings.max_chat_messages == 256


def test_a_prompt_over_the_byte_limit_is_413_counted_in_utf8(gateway):
    client, _ = gateway
    assert client.post("/generate", json={"prompt": "a" * PROMPT_BYTES, "max_tokens": 1}).status_code == 200
    # 33 characters, 66 bytes: the limit counts bytes, not characters
    err = error(client.post("/generate", json={"prompt": "é" * 33, "max_tokens": 1}), 413)
    assert err["code"] == "prompt_too_large" and "66 bytes" in err["message"]
    assert "SCULPTOR_MAX_PROMPT_BYTES" in err["message"]
    err = error(client.post("/v1/completions", json={"prompt": "a" * (PROMPT_BYTES + 1), "max_tokens": 1}), 413)
    assert err["code"] == "prompt_too_large"


def test_messages_count_against_the_byte_limit_together(gateway):
    client, _ = gateway
    half = "b" * (PROMPT_BYTES // 2 + 1)  # each message fits, the two together do not
    err = error(client.post("/v1/chat/completions", json={"messages": chat(2, half), "max_tokens": 1}), 413)
    assert err["code"] == "prompt_too_large" and "messages' text" in err["message"]


def test_too_many_messages_in_a_chat_request(gateway):
    client, _ = gateway
    fits = {"messages": chat(CHAT_MESSAGES), "max_tokens": 1}
    assert client.post("/v1/chat/completions", json=fits).status_code == 200
    for route in ("/v1/chat/completions", "/generate"):
        err = error(client.post(route, json={"messages": chat(CHAT_MESSAGES + 1), "max_tokens": 1}), 400)
        assert err["code"] == "too_many_messages" and f"the limit is {CHAT_MESSAGES}" in err["message"]


def test_stop_sequences_are_bounded_in_number_and_length(gateway):
    client, _ = gateway
    fine = {"prompt": "hi", "max_tokens": 1, "stop": [f"s{i}" for i in range(MAX_STOP_SEQUENCES)]}
    assert client.post("/generate", json=fine).status_code == 200
    many = {**fine, "stop": [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]}
    assert error(client.post("/generate", json=many), 400)["code"] == "too_many_stop_sequences"
    assert error(client.post("/v1/completions", json=many), 400)["code"] == "too_many_stop_sequences"
    long = {"prompt": "hi", "max_tokens": 1, "stop": "x" * (MAX_STOP_CHARS + 1)}
    err = error(client.post("/v1/completions", json=long), 400)
    assert err["code"] == "stop_sequence_too_long" and f"the limit is {MAX_STOP_CHARS}" in err["message"]


def test_an_upload_with_too_many_eval_examples_is_413_and_stores_nothing(gateway):
    client, ctx = gateway
    example = {"prompt": "q", "completion": "a"}
    body = {"name": "t", "examples": [example] * 4, "eval_examples": [example] * (EVAL_EXAMPLES + 1)}
    err = error(client.post("/tasks", json=body), 413)
    assert err["code"] == "too_many_eval_examples" and "SCULPTOR_MAX_EVAL_EXAMPLES" in err["message"]
    files = {"file": ("t.jsonl", b'{"prompt": "q", "completion": "a"}\n'),
             "eval_file": ("e.jsonl", b'{"prompt": "q", "completion": "a"}\n' * (EVAL_EXAMPLES + 1))}
    assert error(client.post("/tasks", files=files), 413)["code"] == "too_many_eval_examples"
    assert ctx.tasks.count() == 0 and ctx.jobs.count() == 0
    body["eval_examples"] = [example] * EVAL_EXAMPLES
    assert client.post("/tasks", json=body).status_code == 202


def test_an_example_with_too_many_messages_is_refused(gateway):
    client, ctx = gateway
    before = ctx.tasks.count()
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 3}
    assert len(long["messages"]) > EXAMPLE_MESSAGES
    body = {"name": "t", "examples": [{"prompt": "q", "completion": "a"}, long]}
    err = error(client.post("/tasks", json=body), 422)
    assert err["code"] == "too_many_messages" and "example 2 of 'examples'" in err["message"]
    body = {"name": "t", "examples": body["examples"][:1], "eval_examples": [long]}
    err = error(client.post("/tasks", json=body), 422)
    assert "'eval_examples'" in err["message"] and "SCULPTOR_MAX_EXAMPLE_MESSAGES" in err["message"]
    assert ctx.tasks.count() == before
