"""The gates' `Generator` on vLLM: what a GPU worker scores its candidates with.

The same prompts (the model's chat template), greedy decoding that stops at the same tokens, and the same
losses as `HFGenerator`: answer and perplexity NLLs come from vLLM's prompt logprobs of the very token ids
the transformers path scores. vLLM batches and pages the KV cache itself, which on a GPU is far faster
than the hand-written loop; on a CPU worker `HFGenerator` stays (`SCULPTOR_GATE_ENGINE`, worker/gate_step.py).

One engine per model version, started after the job has freed its training state, and shut down (its GPU
memory returned) before the next one starts.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from worker.gates.generation import GenerationStats, TextLosses, end_and_stop_ids


class VLLMGenerator:
    def __init__(self, llm, tokenizer, stop_ids: list[int], end_of_turn_id: int):
        self.llm = llm
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.end_of_turn_id = end_of_turn_id
        self.stats = GenerationStats()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None, dtype: str = "float32",
                        gpu_memory_utilization: float = 0.85, max_model_len: int = 4096) -> VLLMGenerator:
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        tokenizer = AutoTokenizer.from_pretrained(path)
        end_of_turn, stop_ids = end_and_stop_ids(tokenizer, _generation_config(path))
        positions = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", max_model_len)
        llm = LLM(model=str(path), dtype=dtype, seed=0, enforce_eager=True, max_model_len=min(max_model_len, positions),
                  gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)
        return cls(llm, tokenizer, stop_ids, end_of_turn)

    def close(self) -> None:
        """Shut the engine down and give its memory back, so the next version's engine fits."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _rendered(self, conversation: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> list[str]:
        tokens = self.greedy([self._rendered(c) for c in conversations], max_new_tokens)
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of token-id prompts, without their stop token (as HFGenerator.greedy)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=self.stop_ids,
                                detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        continuations = [[t for t in out.outputs[0].token_ids if t not in self.stop_ids] for out in outputs]
        self.stats.items += len(prompts)
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.generated_tokens += sum(len(c) for c in continuations)
        self.stats.capped += sum(out.outputs[0].finish_reason == "length" for out in outputs)
        return continuations

    def perplexity(self, texts: Sequence[str]) -> TextLosses:
        encoded = [self.tokenizer(t)["input_ids"] for t in texts]
        return self._losses(encoded, [1] * len(encoded))

    def answer_losses(self, conversations: Sequence[list[dict]], answers: Sequence[str]) -> TextLosses:
        encoded, starts = [], []
        for conversation, answer in zip(conversations, answers):
            prompt_ids = self._rendered(conversation)
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.end_of_turn_id]
            encoded.append(prompt_ids + answer_ids)
            starts.append(len(prompt_ids))
        return self._losses(encoded, starts)

    def _losses(self, encoded: list[list[int]], first_scored: list[int]) -> TextLosses:
        """Summed NLL of each row's tokens from position first_scored[i] on, from vLLM's prompt logprobs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=e) for e in encoded], params, use_tqdm=False)
        nll, tokens = [], []
        for ids, start, out in zip(encoded, first_scored, outputs):
            scored = range(max(1, start), len(ids))  # position 0 has no prediction
            logprobs = [out.prompt_logprobs[i][ids[i]].logprob for i in scored]
            nll.append(-math.fsum(logprobs))
            tokens.append(len(logprobs))
        self.stats.items += len(encoded)
        self.stats.prompt_tokens += sum(len(e) for e in encoded)
        return TextLosses(nll=nll, tokens=tokens)


def _generation_config(path: str | Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's tokens only
        return GenerationConfig()
