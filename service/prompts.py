"""A generation request's prompt as token ids: the chat template applied, and checked against the context."""

from __future__ import annotations

from service.engines.base import EmptyPrompt, PromptTooLong


def encode_prompt(tokenizer, prompt: str | None, messages: list[dict] | None, max_tokens: int,
                  max_model_len: int) -> list[int]:
    if messages is not None:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise EmptyPrompt("the prompt is empty: give at least one token of text")
    if len(ids) + max_tokens > max_model_len:
        raise PromptTooLong(
            f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, but the model's context "
            f"is {max_model_len} tokens: shorten the prompt or lower max_tokens"
        )
    return ids
