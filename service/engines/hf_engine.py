"""transformers engine: the fallback where vLLM is not importable.

One request generates at a time (an asyncio lock), each in a worker thread streaming through
`TextIteratorStreamer`. Pause takes the same lock, so a reload waits for the running request
and later requests wait for the resume.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import AsyncIterator

import torch

from service.engines.base import Chunk, SamplingOptions


GREEDY_BELOW_TEMPERATURE = 1e-5


class TransformersEngine:
    name = "transformers"

    def __init__(self, dtype: str, max_model_len: int):
        self.dtype = getattr(torch, dtype)
        self.max_model_len = max_model_len
        self.model = None
        self.tokenizer = None
        self._lock = asyncio.Lock()

    async def start(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = await asyncio.to_thread(AutoModelForCausalLM.from_pretrained, model_dir, dtype=self.dtype)
        self.model.eval()

    async def generate(self, prompt_ids: list[int], options: SamplingOptions, request_id: str) -> AsyncIterator[Chunk]:
        from transformers import TextIteratorStreamer

        async with self._lock:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: dict = {}
            thread = threading.Thread(target=self._run, args=(prompt_ids, options, streamer, result), daemon=True)
            thread.start()
            text = ""
            loop = asyncio.get_running_loop()
            while True:
                piece = await loop.run_in_executor(None, next, streamer, None)
                if piece is None:
                    break
                cut = _stop_at(text + piece, options.stop)
                if cut is not None:
                    yield Chunk(cut[len(text):])
                    text = cut
                    result["stopped"] = True
                    break
                text += piece
                if piece:
                    yield Chunk(piece)
            await asyncio.to_thread(thread.join)
            if "error" in result:
                raise result["error"]
            finish = "stop" if result.get("stopped") or result.get("eos") else "length"
            yield Chunk("", finish, len(prompt_ids), result.get("completion_tokens", 0))

    def _run(self, prompt_ids, options, streamer, result) -> None:
        try:
            if options.seed is not None:
                torch.manual_seed(options.seed)
            # As vLLM does: a temperature this close to 0 is greedy (dividing logits by 5e-324 gives inf).
            sample = options.temperature >= GREEDY_BELOW_TEMPERATURE
            with torch.no_grad():
                out = self.model.generate(
                    torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                    max_new_tokens=options.max_tokens, do_sample=sample,
                    temperature=options.temperature if sample else None, top_p=options.top_p if sample else None,
                    streamer=streamer, pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
            new = out[0, len(prompt_ids):]
            result["completion_tokens"] = int(new.numel())
            result["eos"] = bool(new.numel()) and int(new[-1]) == self.tokenizer.eos_token_id
        except Exception as err:  # surfaced to the caller after the stream ends
            result["error"] = err
            streamer.end()

    async def pause(self) -> None:
        await self._lock.acquire()

    async def reload(self, model_dir: Path) -> None:
        from safetensors.torch import load_file

        state = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            state.update(load_file(path))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")

    async def resume(self) -> None:
        self._lock.release()

    async def shutdown(self) -> None:
        self.model = None


def _stop_at(text: str, stops: list[str]) -> str | None:
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None
