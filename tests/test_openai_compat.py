"""The OpenAI surface, through the official `openai` client, on a live gateway with a real vLLM engine.

A tiny random Llama answers, so only shapes are checked: what each request returns, that nothing asked
for is silently dropped, and that every answer and stream chunk names the version that produced it,
also across a hot-swap under load.
"""

import json
import math
import os
import re
import threading
import time

import httpx
import openai
import pytest
from gateway_helpers import running_gateway, tiny_settings

from sculptor import checkpoints
from sculptor.records import ModelVersion
from sculptor.tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

HELLO = [{"role": "user", "content": "hello world"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima"]}},
                   "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                           "sure": {"type": "boolean"}},
          "required": ["answer", "sure"], "additionalProperties": False}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url, tiny_model_dir):
    var = tmp_path_factory.mktemp("compat")
    # Compact JSON: a random model otherwise fills its budget with the blanks JSON allows between tokens.
    settings = tiny_settings(var, redis_url, tiny_model_dir, engine="vllm", engine_dtype="bfloat16",
                             engine_enforce_eager=True, engine_max_model_len=1024, engine_max_num_seqs=8,
                             engine_kv_cache_gib=1, engine_json_without_whitespace=True)
    with running_gateway(settings) as (url, ctx):
        yield url, ctx


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, **kwargs):
    raw = client.chat.completions.with_raw_response.create(**{"model": "current", "max_tokens": 8, **kwargs})
    answer = raw.parse()
    assert raw.headers["x-model-version"] == answer.model == answer.model_extra["model_version"] == "v0"
    return answer


def test_content_parts_and_the_developer_role(client):
    answer = chat(client, messages=[{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                                    {"role": "user", "content": [{"type": "text", "text": "hello"},
                                                                 {"type": "text", "text": " world"}]}])
    assert isinstance(answer.choices[0].message.content, str)


def test_n_gives_that_many_choices(client):
    assert [c.index for c in chat(client, messages=HELLO, n=2).choices] == [0, 1]


def test_logprobs_are_present_and_finite(client):
    answer = chat(client, messages=HELLO, logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for token in content:
        assert math.isfinite(token.logprob) and len(token.top_logprobs) == 2
        assert all(math.isfinite(t.logprob) for t in token.top_logprobs)


def test_json_object_output_is_constrained(client):
    answer = chat(client, messages=HELLO, response_format={"type": "json_object"}, max_completion_tokens=48)
    assert answer.choices[0].message.content.startswith("{")


def test_json_schema_output_parses_and_validates(client):
    answer = chat(client, messages=HELLO, max_completion_tokens=48,
                  response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}})
    value = json.loads(answer.choices[0].message.content)
    assert set(value) == {"answer", "sure"} and value["answer"] in ("yes", "no") and isinstance(value["sure"], bool)


def test_a_named_tool_choice_answers_with_a_tool_call(client):
    answer = chat(client, messages=HELLO, tools=[WEATHER], max_tokens=160,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = answer.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and isinstance(call.function.arguments, str)


def test_tools_with_automatic_choice_have_the_openai_shape(client):
    answer = chat(client, messages=HELLO, tools=[WEATHER], tool_choice="auto", max_tokens=16)
    message = answer.choices[0].message
    assert message.role == "assistant" and (message.content is not None or message.tool_calls)


def test_completions_take_lists_of_prompts_and_token_ids(client):
    answer = client.completions.create(model="current", prompt=["hello world", "the model"], max_tokens=4)
    assert [c.index for c in answer.choices] == [0, 1] and answer.model == "v0"
    answer = client.completions.create(model="v0", prompt=[5, 6, 7], max_tokens=4)
    assert answer.usage.prompt_tokens == 3


def test_echo_returns_the_prompt_first(client):
    answer = client.completions.create(model="current", prompt="hello world", max_tokens=4, echo=True)
    assert answer.choices[0].text.startswith("hello world")


def test_streams_carry_the_version_in_every_chunk_and_end_with_usage(client):
    chunks = list(client.chat.completions.create(model="current", messages=HELLO, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks and all(c.model == "v0" and c.model_extra["model_version"] == "v0" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_models_lists_current_and_every_promoted_version(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"current", "v0"}
    assert cards["current"].model_extra["model_version"] == "v0" and cards["v0"].model_extra["served"]


def test_a_version_no_replica_holds_is_not_found_and_never_answered_by_another(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="v9", messages=HELLO, max_tokens=2)
    assert err.value.code == "model_not_found" and "v0" in err.value.message
    assert chat(client, messages=HELLO).model == "v0"  # naming the version it holds is fine


def test_sculptor_bounds_apply_to_what_vllm_serves(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="current", messages=HELLO, n=17, max_tokens=2)
    assert err.value.code == "too_many_completions"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="current", messages=HELLO, max_tokens=10**6)
    assert err.value.code == "max_tokens_too_large"


def test_a_stream_whose_client_leaves_ends_the_engine_request(gateway):
    """16 choices of 1,000 tokens that ignore EOS keep the tiny model busy for about 5 s here (8 at a time);
    the client leaves after the first chunk, and the engine must be idle well before they could finish."""
    url, _ = gateway

    def running() -> float:
        text = httpx.get(f"{url}/metrics").text
        return float(re.search(r'^sculptor_engine_running_requests\{replica="0"\} (\S+)$', text, re.M).group(1))

    body = {"messages": HELLO, "max_tokens": 1000, "n": 16, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as streaming:
        lines = streaming.iter_lines()
        assert '"model_version":"v0"' in next(line for line in lines if line.startswith("data: {"))
        assert running() == 16  # vLLM runs each choice as its own request
    deadline = time.monotonic() + 1.5
    while running() != 0:
        assert time.monotonic() < deadline, "the engine still generates after its client left"
        time.sleep(0.05)


def test_tokenize_and_detokenize_round_trip(gateway):
    url, _ = gateway
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == "hello world"


def test_every_chunk_names_its_version_across_a_hot_swap_under_load(gateway, client, tmp_path):
    """Streams run while v1 is promoted: none fails, each is labelled by one version throughout, and
    requests after the swap are answered by v1."""
    url, ctx = gateway
    checkpoints.publish_dir(ctx.store, build_tiny_model(tmp_path / "v1", seed=1), "v1")
    results, failures = [], []

    def stream_forever(stop: threading.Event):
        while not stop.is_set():
            try:
                chunks = list(client.chat.completions.create(model="current", messages=HELLO, max_tokens=24,
                                                             stream=True))
                results.append({(c.model, c.model_extra["model_version"]) for c in chunks})
            except Exception as err:  # noqa: BLE001 - any failure counts
                failures.append(repr(err))

    stop = threading.Event()
    threads = [threading.Thread(target=stream_forever, args=(stop,)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while len(results) < 4:
            threading.Event().wait(0.2)
        ctx.versions.promote(ModelVersion(version="v1", parent="v0",
                                          checkpoint_uri=ctx.store.uri(checkpoints.prefix("v1"))))
        for _ in range(600):
            if httpx.get(f"{url}/v1/models").json()["data"][0]["model_version"] == "v1" and \
                    any(labels == {("v1", "v1")} for labels in results):
                break
            threading.Event().wait(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures
    assert all(len(labels) == 1 for labels in results), "one version per stream"
    assert {next(iter(labels)) for labels in results} == {("v0", "v0"), ("v1", "v1")}
    assert client.chat.completions.create(model="current", messages=HELLO, max_tokens=2).model == "v1"
