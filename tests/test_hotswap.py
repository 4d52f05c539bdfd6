"""Hot-swap on a real in-process vLLM engine (tiny random Llamas as versions).

- greedy output after a swap equals a fresh engine's on the new checkpoint; after a rollback, the old one's;
- a swap to a version that differs in a few tensors reloads only those, with the same output as a fresh engine;
- requests in flight across a swap all complete;
- a corrupted checkpoint is refused before the engine is touched, and a checkpoint the engine cannot
  load is rolled back: in both cases the old version keeps serving;
- a request whose stream is closed (its client went away) is aborted in the engine.
"""

import asyncio
import os
import shutil

import pytest
import torch
from gateway_helpers import context_with_two_versions
from safetensors.torch import load_file, save_file

from sculptor import checkpoints
from sculptor.tiny_model import build_tiny_model
from service.engines.base import SamplingOptions
from service.engines.vllm_engine import VLLMEngine
from service.generation import collect, open_stream
from service.hotswap import ServingModel

pytestmark = pytest.mark.e2e
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = ["hello world", "the model learns", "reverse copy upper"]
GREEDY = SamplingOptions(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("swap")
    context = context_with_two_versions(root, redis_url)
    wrong = build_tiny_model(root / "wrong-shape", seed=2, num_layers=1, intermediate_size=384)
    checkpoints.publish_dir(context.store, wrong, "v-wrong-shape")
    checkpoints.publish_dir(context.store, root / "v1", "v-corrupt")
    blob = context.store.get_bytes("checkpoints/v-corrupt/model.safetensors")
    context.store.put_bytes("checkpoints/v-corrupt/model.safetensors", blob[:-64] + bytes(64))
    checkpoints.publish_dir(context.store, edited(root / "v1", root / "v1-edit", EDITED), "v1-edit")
    return context


# One part of a fused layer (q of qkv_proj) and the tied embeddings: the partial reload must load the
# whole fused layer and refresh the lm_head's kernel.
EDITED = ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight")


def edited(source, target, names):
    """A copy of the checkpoint in `source` with noise added to the tensors `names`."""
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    noise = torch.Generator().manual_seed(7)
    for name in names:
        weights[name] = weights[name] + 0.5 * weights[name].std() * torch.randn(weights[name].shape, generator=noise)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def serving(ctx, pause_mode: str = "keep") -> ServingModel:
    return ServingModel(ctx, VLLMEngine("bfloat16", 512, 8, enforce_eager=True, pause_mode=pause_mode))


async def start_requests(model: ServingModel, prompts: list[str], options: list[SamplingOptions]):
    """Open each request and wait for its first chunk: when this returns, every one is inside the engine."""
    streams = [await open_stream(model, p, None, o) for p, o in zip(prompts, options)]
    firsts = await asyncio.gather(*(anext(s.chunks) for s in streams))
    return list(zip(streams, firsts))


async def finish(stream, first) -> tuple[str, object]:
    if first.finish_reason:
        return first.text, first
    text, last = await collect(stream)
    return first.text + text, last


async def greedy(model: ServingModel) -> list[str]:
    outs = []
    for p in PROMPTS:
        text, _ = await collect(await open_stream(model, p, None, GREEDY))
        outs.append(text)
    return outs


@pytest.fixture(scope="module")
def fresh(ctx, loop) -> dict[str, list[str]]:
    """Greedy output of a fresh engine on each version: what a swapped engine must reproduce."""
    async def outputs(version: str) -> list[str]:
        engine = serving(ctx)
        await engine.start(version)
        try:
            return await greedy(engine)
        finally:
            await engine.engine.shutdown()

    out = {v: loop.run_until_complete(outputs(v)) for v in ("v0", "v1", "v1-edit")}
    assert out["v0"] != out["v1"] != out["v1-edit"]  # a swap must show
    return out


@pytest.fixture(scope="module")
def engine(ctx, loop):
    model = serving(ctx)
    loop.run_until_complete(model.start("v0"))
    yield model
    loop.run_until_complete(model.engine.shutdown())


@pytest.fixture
def model(engine, loop) -> ServingModel:
    """The module's engine serving v0 in pause mode "keep", whatever the test before left."""
    engine.engine.pause_mode = "keep"
    assert loop.run_until_complete(engine.swap_to("v0")).ok
    return engine


def test_greedy_output_after_a_swap_equals_a_fresh_engines(model, fresh, loop):
    assert loop.run_until_complete(model.swap_to("v1")).ok and model.version == "v1"
    assert loop.run_until_complete(greedy(model)) == fresh["v1"]


def test_a_swap_reloads_only_the_changed_tensors_with_a_fresh_engines_output(model, fresh, loop):
    assert loop.run_until_complete(model.swap_to("v1")).ok
    record = loop.run_until_complete(model.swap_to("v1-edit"))
    assert record.ok and record.changed_tensors == len(EDITED)
    assert loop.run_until_complete(greedy(model)) == fresh["v1-edit"]


def test_after_a_rollback_the_old_versions_output_comes_back(model, fresh, loop):
    assert loop.run_until_complete(model.swap_to("v1")).ok
    assert loop.run_until_complete(model.swap_to("v0")).ok
    assert loop.run_until_complete(greedy(model)) == fresh["v0"]


def test_requests_in_flight_across_a_swap_all_complete(model, loop):
    async def scenario():
        started = await start_requests(model, [f"{p} {i}" for i, p in enumerate(PROMPTS * 3)],
                                       [SamplingOptions(max_tokens=48, temperature=0.8, seed=i) for i in range(9)])
        assert sum(first.finish_reason is None for _, first in started) >= 5  # most are mid-generation
        record = await model.swap_to("v1")
        results = await asyncio.gather(*(finish(*s) for s in started))
        assert record.ok and model.version == "v1"
        assert all(last.finish_reason in ("stop", "length") for _, last in results)

    loop.run_until_complete(scenario())


@pytest.mark.parametrize("version, error", [("v-corrupt", "checksum"), ("v-wrong-shape", "architecture")])
def test_a_checkpoint_that_fails_verification_is_refused_and_v0_keeps_serving(model, fresh, loop, version, error):
    record = loop.run_until_complete(model.swap_to(version))
    assert not record.ok and error in record.error and model.version == "v0"
    assert loop.run_until_complete(greedy(model)) == fresh["v0"]


def test_a_reload_that_fails_in_the_engine_puts_the_old_weights_back(model, fresh, loop):
    real_reload = model.engine.reload

    async def failing_once(model_dir, changed=None):
        model.engine.reload = real_reload
        await real_reload(model_dir, changed)  # half-done: new weights are in when the failure hits
        raise RuntimeError("injected reload failure")

    model.engine.reload = failing_once
    broken = loop.run_until_complete(model.swap_to("v1"))
    assert not broken.ok and "injected" in broken.error and model.version == "v0"
    assert loop.run_until_complete(greedy(model)) == fresh["v0"]  # put back before resuming


def test_pause_mode_wait_lets_requests_in_flight_finish_on_the_old_version(model, loop):
    async def scenario():
        long = SamplingOptions(max_tokens=48, temperature=0.0)
        expected = [(await collect(await open_stream(model, p, None, long)))[0] for p in PROMPTS]
        model.engine.pause_mode = "wait"
        started = await start_requests(model, PROMPTS, [long] * len(PROMPTS))
        assert any(first.finish_reason is None for _, first in started)
        in_flight = [asyncio.create_task(finish(*s)) for s in started]
        assert (await model.swap_to("v1")).ok
        assert [text for text, _ in await asyncio.gather(*in_flight)] == expected

    loop.run_until_complete(scenario())


def test_closing_a_stream_aborts_its_request_in_the_engine(model, loop):
    async def scenario():
        gone = await open_stream(model, "hello world", None, SamplingOptions(max_tokens=400, temperature=0.0))
        assert not (await anext(gone.chunks)).finish_reason and model.engine.running_requests() == 1
        await gone.chunks.aclose()
        assert model.engine.running_requests() == 0 and model.pool.replicas[0].in_flight == 0

    loop.run_until_complete(scenario())
