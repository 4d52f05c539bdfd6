"""Generation for evaluation, behind an engine-agnostic `Generator` protocol.

`HFGenerator` runs a transformers causal LM: greedy decoding with its own loop (see `greedy`),
prompts rendered with the model's chat template, batches of similar-length prompts (sorted by
length, so little compute goes to padding). Perplexity scores raw text (no chat template), every
token after the first.

Batch size 64: decoding on CPU is cheaper per token in larger batches (SmolLM2-135M, one thread,
CPU time per generated token: 10.4 ms at batch 16, 7.5 ms at 32, 7.0 ms at 56; prefill ~3.5 ms per
prompt token), and a suite part (56 refusal prompts, 32 IFEval prompts, a task's eval set) then
decodes in one batch whose rows drop out as they finish.

Precision: fp32 by default. On the 2-core development machine (AVX2, no bf16 instructions) bf16 is
4-7x slower: under autocast the weights are re-cast on every decoding step. `bf16_autocast=True`
is there for CPUs and GPUs where bf16 pays off.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import DynamicCache

from worker.training.device import autocast


@dataclass
class GenerationStats:
    """Running totals of one generator's work, so callers can see where decoding time goes."""

    items: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # what the model read: the shared prefix once, then each row's padded suffix
    generated_tokens: int = 0
    capped: int = 0  # items that reached max_new_tokens without a stop token


@dataclass
class TextLosses:
    nll: list[float]  # summed negative log-likelihood per text (nats)
    tokens: list[int]  # scored tokens per text


class Generator(Protocol):
    def generate(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> list[str]: ...

    def perplexity(self, texts: Sequence[str]) -> TextLosses: ...

    def answer_losses(self, conversations: Sequence[list[dict]], answers: Sequence[str]) -> TextLosses: ...


class HFGenerator:
    def __init__(self, model, tokenizer, batch_size: int = 64, bf16_autocast: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.bf16_autocast = bf16_autocast
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.end_of_turn_id, self.stop_ids = end_and_stop_ids(tokenizer, model.generation_config)
        self.stats = GenerationStats()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None, **kwargs) -> HFGenerator:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device or "cpu")
        return cls(model, AutoTokenizer.from_pretrained(path), **kwargs)

    def _autocast(self):
        return autocast(self.device, self.bf16_autocast)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):
            ids[k, width - len(row):] = torch.tensor(row)
            mask[k, width - len(row):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate(self, conversations: Sequence[list[dict]], max_new_tokens: int) -> list[str]:
        prompts = [self.tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
                   for c in conversations]
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        outputs = [""] * len(encoded)
        for batch in self._batches([len(e) for e in encoded]):
            for i, tokens in zip(batch, self.greedy([encoded[i] for i in batch], max_new_tokens)):
                outputs[i] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return outputs

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of token-id prompts, without their stop token.

        Two savings over `model.generate`, same tokens out (tested):
          - the prefix all prompts share (the chat template's system turn, ~20 tokens for SmolLM2)
            is prefilled once and its cache copied to every row; each row is laid out as
            [shared prefix][left padding][own suffix], with explicit positions;
          - a row leaves the batch as soon as it emits a stop token (its cache rows are dropped),
            so the remaining steps only pay for the rows still decoding.
        """
        cache = DynamicCache(config=self.model.config)
        shared = _shared_prefix_length(prompts)
        if shared:
            with self._autocast():
                self.model(input_ids=torch.tensor([prompts[0][:shared]], device=self.device),
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(len(prompts))
        ids, suffix_mask = self._left_padded([p[shared:] for p in prompts])
        positions = shared + (suffix_mask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([suffix_mask.new_ones((len(prompts), shared)), suffix_mask], dim=1)
        with self._autocast():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        self.stats.items += len(prompts)
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.prefilled_tokens += shared + ids.numel()
        return self._decode(logits, cache, mask, positions[:, -1] + 1, max_new_tokens)

    def _decode(self, logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor, next_position: torch.Tensor,
                max_new_tokens: int) -> list[list[int]]:
        """The decoding steps after the prefill: one token per live row per step, finished rows dropped."""
        out = [[] for _ in range(len(logits))]
        alive = torch.arange(len(logits))  # original row of each row still decoding
        stop = torch.tensor(self.stop_ids, device=self.device)
        for step in range(max_new_tokens):
            tokens = logits.argmax(-1)
            finished = torch.isin(tokens, stop)
            for row, token in zip(alive[~finished].tolist(), tokens[~finished].tolist()):
                out[row].append(token)
            self.stats.generated_tokens += int((~finished).sum())
            if step == max_new_tokens - 1:
                self.stats.capped += int((~finished).sum())
                break
            if finished.all():
                break
            if finished.any():
                keep = (~finished).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                alive, tokens, mask, next_position = alive[keep.cpu()], tokens[keep], mask[keep], next_position[keep]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            with self._autocast():
                logits = self.model(input_ids=tokens[:, None], attention_mask=mask,
                                    position_ids=next_position[:, None], past_key_values=cache,
                                    use_cache=True).logits[:, -1]
            next_position = next_position + 1
        return out

    @torch.inference_mode()
    def perplexity(self, texts: Sequence[str]) -> TextLosses:
        encoded = [self.tokenizer(t)["input_ids"] for t in texts]
        return self._losses(encoded, [1] * len(encoded))

    @torch.inference_mode()
    def answer_losses(self, conversations: Sequence[list[dict]], answers: Sequence[str]) -> TextLosses:
        """NLL of each answer (teacher-forced, after its chat-rendered prompt), answer tokens only."""
        encoded, starts = [], []
        for conversation, answer in zip(conversations, answers):
            prompt = self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.end_of_turn_id]
            encoded.append(prompt_ids + answer_ids)
            starts.append(len(prompt_ids))
        return self._losses(encoded, starts)

    def _losses(self, encoded: list[list[int]], first_scored: list[int]) -> TextLosses:
        """Summed NLL of each row's tokens from position first_scored[i] on (each predicted from the ones before)."""
        self.stats.items += len(encoded)
        self.stats.prompt_tokens += sum(len(e) for e in encoded)
        nll, tokens = [0.0] * len(encoded), [0] * len(encoded)
        for batch in self._batches([len(e) for e in encoded]):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, :len(encoded[i])] = 1
            self.stats.prefilled_tokens += ids.numel()
            with self._autocast():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            targets = ids[:, 1:].to(self.device)
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
            scored = mask[:, 1:].clone()
            for row, i in enumerate(batch):
                scored[row, :max(0, first_scored[i] - 1)] = 0
            scored = scored.to(self.device)
            for row, i in enumerate(batch):
                nll[i] = float((losses[row] * scored[row]).sum())
                tokens[i] = int(scored[row].sum())
        return TextLosses(nll=nll, tokens=tokens)


def end_and_stop_ids(tokenizer, generation_config) -> tuple[int, list[int]]:
    """The token that ends a scored answer (ChatML's <|im_end|> where the tokenizer has it, else EOS), and
    every token that stops greedy decoding (those two and the model's configured EOS ids)."""
    chatml_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(chatml_end, int) or chatml_end == tokenizer.unk_token_id:
        chatml_end = None
    ids = {tokenizer.eos_token_id, chatml_end}
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    end_of_turn = chatml_end if chatml_end is not None else tokenizer.eos_token_id
    return end_of_turn, sorted(i for i in ids if i is not None)


def _shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens at the start of every prompt, leaving each prompt at least one token of its own."""
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n
