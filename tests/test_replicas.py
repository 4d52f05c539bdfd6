"""Engine replicas behind one gateway: two real in-process vLLM engines (tiny random Llamas as versions),
shared by the tests of this module.

- a rolling swap: streams in flight across it all complete, every answer's text is the greedy output of
  exactly the version it is labelled with, and at every moment at least one replica admits requests;
- a reload that fails on the second replica leaves both replicas on the old version;
- gateways swap one at a time through the Redis lock, and swap without it when Redis is away.
"""

import asyncio
import os
import threading
import time

import pytest
from gateway_helpers import context_with_two_versions

from sculptor.context import Context
from sculptor.locks import held_lock
from sculptor.records import connect
from sculptor.redis_server import free_port
from service.engines.base import SamplingOptions
from service.engines.hf_engine import TransformersEngine
from service.engines.vllm_engine import VLLMEngine
from service.generation import open_stream
from service.hotswap import FLEET_LOCK, ServingModel
from service.prompts import encode_prompt
from service.replicas import Replica

pytestmark = pytest.mark.e2e
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = ["hello world", "the model learns", "reverse copy upper", "count number letter", "yes no sorry"]
GREEDY = SamplingOptions(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, redis_url):
    return context_with_two_versions(tmp_path_factory.mktemp("replicas"), redis_url)


@pytest.fixture(scope="module")
def pair(ctx, loop):
    """One gateway's serving model with two vLLM replicas, serving v0."""
    # float32: the logits of a tiny random model lie close together, and batched bf16 could flip a greedy choice
    engines = [VLLMEngine("float32", 512, 8, enforce_eager=True) for _ in range(2)]
    model = ServingModel(ctx, engines)
    loop.run_until_complete(model.start("v0"))
    yield model
    loop.run_until_complete(model.shutdown())


async def greedy_on(replica: Replica, prompt: str, model: ServingModel) -> str:
    ids = encode_prompt(model.tokenizer, prompt, None, GREEDY.max_tokens, model.engine.max_model_len)
    pieces = [chunk.text async for chunk in replica.engine.generate(ids, GREEDY, f"ref-{time.monotonic_ns()}")]
    return "".join(pieces)


async def greedy_all(model: ServingModel, replica: Replica) -> dict[str, str]:
    return {p: await greedy_on(replica, p, model) for p in PROMPTS}


async def serve_until(model: ServingModel, client: int, stop: asyncio.Event, answers: list | None = None) -> list[tuple]:
    """One streaming client, request after request: (prompt, label, text, finish_reason) of each."""
    answers, n = ([] if answers is None else answers), 0
    while not stop.is_set():
        prompt = PROMPTS[(client + n) % len(PROMPTS)]
        stream = await open_stream(model, prompt, None, GREEDY)
        pieces, finish = [], None
        async for chunk in stream.chunks:
            pieces.append(chunk.text)
            finish = chunk.finish_reason or finish
        answers.append((prompt, stream.version, "".join(pieces), finish))
        n += 1
    return answers


async def until(condition, timeout_s: float = 60) -> None:
    """Wait for a condition on the event loop (the clients keep running meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.01)


class AdmissionWatch:
    """Samples which replicas admit requests, every millisecond, while a swap rolls."""

    def __init__(self, model: ServingModel):
        self.model = model
        self.seen: set[tuple[str, ...]] = set()  # versions of the admitted replicas, as seen at each sample
        self.task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            self.seen.add(tuple(sorted(r.version for r in self.model.pool.replicas if r.admitted)))
            await asyncio.sleep(0.001)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def back_to(model: ServingModel, version: str) -> None:
    model.refused.discard(version)
    assert (await model.swap_to(version)).ok and {r.version for r in model.pool.replicas} == {version}


def test_rolling_swap_answers_come_from_exactly_one_version(pair, loop):
    async def scenario():
        await back_to(pair, "v0")
        first, second = pair.pool.replicas
        expected = {"v0": await greedy_all(pair, first)}
        assert await greedy_all(pair, second) == expected["v0"]

        watch = AdmissionWatch(pair)
        stop = asyncio.Event()
        live: list[list] = [[] for _ in range(6)]
        clients = [asyncio.create_task(serve_until(pair, c, stop, live[c])) for c in range(6)]
        await until(lambda: sum(r.in_flight for r in pair.pool.replicas) >= 2)
        in_flight_at_swap = sum(r.in_flight for r in pair.pool.replicas)
        record = await pair.swap_to("v1")
        await until(lambda: sum(a[1] == "v1" for client in live for a in client) >= 6)  # answers after the swap
        stop.set()
        answers = [a for client in await asyncio.gather(*clients) for a in client]
        await watch.stop()
        expected["v1"] = await greedy_all(pair, first)

        assert record.ok and pair.version == "v1" and [r.version for r in pair.pool.replicas] == ["v1", "v1"]
        assert await greedy_all(pair, second) == expected["v1"]
        assert all(expected["v0"][p] != expected["v1"][p] for p in PROMPTS)  # a label is checkable
        assert in_flight_at_swap >= 2  # streams were in flight when the swap began
        assert all(finish in ("stop", "length") for _, _, _, finish in answers)
        wrong = [(p, label, text) for p, label, text, _ in answers if text != expected[label][p]]
        assert not wrong, f"answers that are not their labelled version's greedy output: {wrong[:3]}"
        assert {label for _, label, _, _ in answers} == {"v0", "v1"}
        assert () not in watch.seen  # never zero capacity ...
        assert {("v0",), ("v1",)} <= watch.seen  # ... while each replica in turn was out of rotation
        assert record.drain_s > 0 and record.stall_s == 0.0

    loop.run_until_complete(scenario())


def test_failed_reload_on_second_replica_leaves_both_on_old_version(pair, loop):
    async def scenario():
        await back_to(pair, "v0")
        expected = await greedy_all(pair, pair.pool.replicas[0])
        reloads: list[str] = []
        real = {r.index: r.engine.reload for r in pair.pool.replicas}

        def failing_second(replica: Replica):
            async def reload(model_dir, changed=None):
                reloads.append(f"{replica.index}:{model_dir.name}")
                await real[replica.index](model_dir, changed)  # half-done: the new weights are in when the failure hits
                if len(reloads) == 2:
                    raise RuntimeError("injected reload failure")
            return reload

        for replica in pair.pool.replicas:
            replica.engine.reload = failing_second(replica)
        try:
            record = await pair.swap_to("v1")
        finally:
            for replica in pair.pool.replicas:
                replica.engine.reload = real[replica.index]

        first, second = (int(call.split(":")[0]) for call in reloads[:2])
        assert first != second  # the failure hit the second replica of the roll
        # second replica: v1 (fails) then v0 restored; first replica: rolled back to v0
        assert reloads == [f"{first}:v1", f"{second}:v1", f"{second}:v0", f"{first}:v0"]
        assert not record.ok and f"replica {second}" in record.error and "injected" in record.error
        assert pair.version == "v0" and [r.version for r in pair.pool.replicas] == ["v0", "v0"]
        assert all(r.admitted for r in pair.pool.replicas)
        for replica in pair.pool.replicas:
            assert await greedy_all(pair, replica) == expected

    loop.run_until_complete(scenario())


def test_gateway_waits_for_another_gateways_swap(pair, loop, ctx):
    other_gateway_swapping = threading.Event()

    def other_gateway():
        with held_lock(connect(ctx.settings.redis_url), FLEET_LOCK, ttl_s=10, wait_s=5):
            other_gateway_swapping.set()
            time.sleep(1.5)

    holder = threading.Thread(target=other_gateway)
    holder.start()
    assert other_gateway_swapping.wait(10)
    record = loop.run_until_complete(pair.swap_to("v1" if pair.version == "v0" else "v0"))
    holder.join()
    assert record.ok and record.lock_wait_s >= 1.0


def test_swap_without_lock_when_redis_is_away(ctx, loop):
    settings = ctx.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    gateway = ServingModel(Context(settings, connect(settings.redis_url), ctx.store),
                           TransformersEngine("float32", 512))

    async def scenario():
        await gateway.start("v0")
        started = time.monotonic()
        record = await gateway.swap_to("v1")
        return record, time.monotonic() - started

    record, took = loop.run_until_complete(scenario())
    assert record.ok and gateway.version == "v1"
    assert took < 15  # no deadlock: a short wait for Redis, then the swap goes ahead
