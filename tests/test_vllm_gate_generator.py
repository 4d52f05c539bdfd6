"""The gates' vLLM generator (what GPU workers score with) against the transformers one (CPU workers),
both in fp32 on the same tiny model: the same greedy tokens, and the same losses within 1e-4 relative."""

import os

import pytest

from worker.gates.generation import HFGenerator
from worker.gates.vllm_generator import VLLMGenerator

pytestmark = pytest.mark.e2e
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

CONVERSATIONS = [[{"role": "user", "content": p}] for p in
                 ("hello world", "the model learns", "reverse copy upper", "count number letter", "why stop")]
TEXTS = ["hello world the model learns", "copy upper lower count", "1 + 2 = 3"]


@pytest.fixture(scope="module")
def generators(tiny_model_dir):
    vllm = VLLMGenerator.from_pretrained(tiny_model_dir)
    yield HFGenerator.from_pretrained(tiny_model_dir), vllm
    vllm.close()


def close(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b, strict=True))


def test_greedy_tokens_are_the_same(generators):
    hf, vllm = generators
    prompts = [vllm._rendered(c) for c in CONVERSATIONS]  # the chat template, as HFGenerator.generate renders it
    expected = hf.greedy(prompts, 16)
    assert any(expected), "the tiny model must say something for this test to mean anything"
    assert vllm.greedy(prompts, 16) == expected
    assert vllm.generate(CONVERSATIONS, 16) == hf.generate(CONVERSATIONS, 16)


def test_answer_losses_and_perplexity_agree(generators):
    hf, vllm = generators
    answers = ["hello world", "sure here is", "no"] + ["yes"] * (len(CONVERSATIONS) - 3)
    a, b = hf.answer_losses(CONVERSATIONS, answers), vllm.answer_losses(CONVERSATIONS, answers)
    assert a.tokens == b.tokens and close(a.nll, b.nll)
    a, b = hf.perplexity(TEXTS), vllm.perplexity(TEXTS)
    assert a.tokens == b.tokens and close(a.nll, b.nll)


def test_the_gates_scores_are_the_same_on_either_engine(generators):
    """gates.evaluate on the shipped suites (subsampled): every score equal, perplexity within 1e-4."""
    from sculptor.datasets import Example
    from worker.gates import SuiteSizes, evaluate, load_suites

    hf, vllm = generators
    suites = load_suites(sizes=SuiteSizes(harmful=4, benign=3, ifeval=3, general_text=3, general_chat=4))
    task = {"T": ("exact_match", [Example(messages=[{"role": "user", "content": f"say {w}"},
                                                    {"role": "assistant", "content": w}]) for w in ("yes", "no")])}
    a, b = evaluate(hf, task, suites), evaluate(vllm, task, suites)
    for part in ("harmful_refusal", "benign_refusal", "ifeval_strict", "ifeval_loose"):
        assert getattr(a, part).values == getattr(b, part).values, part
    assert a.tasks["T"].values == b.tasks["T"].values
    assert a.general_chat.answers == b.general_chat.answers
    assert close([a.perplexity.perplexity], [b.perplexity.perplexity])
    assert close(list(a.general_chat.per_token()), list(b.general_chat.per_token()))


def test_auto_picks_vllm_on_cuda_workers_only():
    from worker.gate_step import gate_engine

    assert gate_engine("auto", "cpu") == "transformers" and gate_engine("auto", None) == "transformers"
    assert gate_engine("auto", "cuda:0") == "vllm"  # vLLM is installed here
    assert gate_engine("transformers", "cuda:0") == "transformers" and gate_engine("vllm", "cpu") == "vllm"
