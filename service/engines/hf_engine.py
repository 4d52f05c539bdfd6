"""transformers engine: the fallback where vLLM is not importable.

One request generates at a time (an asyncio lock), each in a worker thread streaming through
`TextIteratorStreamer`. Pause takes the same lock, so a reload waits for the running request
and later requests wait for the resume. A request that ends early (a stop sequence, or its client went
away and the stream was cancelled or closed) stops the model at its next token, and the lock is held until
it has stopped.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import AsyncIterator

import anyio
import torch

from service.engines.base import Chunk, SamplingOptions


GREEDY_BELOW_TEMPERATURE = 1e-5


class TransformersEngine:
    name = "transformers"
    openai = None  # no vLLM serving layer: the /v1 routes use their own subset (service/api/openai_fallback.py)

    def __init__(self, dtype: str, max_model_len: int):
        self.dtype = getattr(torch, dtype)
        self.max_model_len = max_model_len
        self.model = None
        self.tokenizer = None
        self._lock = asyncio.Lock()
        self.running = 0  # requests whose model.generate is still running

    def running_requests(self) -> int:
        return self.running

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
            cancel = threading.Event()
            thread = threading.Thread(target=self._run, args=(prompt_ids, options, streamer, result, cancel),
                                      daemon=True)
            thread.start()
            self.running += 1
            try:
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
            finally:  # also on cancellation or aclose: the model stops at its next token
                cancel.set()
                # Shielded: sse-starlette cancels a stream through an anyio scope, which cancels every await
                # in it again; the lock must stay held until the model has stopped.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(thread.join)
                self.running -= 1
            if "error" in result:
                raise result["error"]
            finish = "stop" if result.get("stopped") or result.get("eos") else "length"
            yield Chunk("", finish, len(prompt_ids), result.get("completion_tokens", 0))

    def _run(self, prompt_ids, options, streamer, result, cancel: threading.Event) -> None:
        from transformers import StoppingCriteriaList

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
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                )
            new = out[0, len(prompt_ids):]
            result["completion_tokens"] = int(new.numel())
            result["eos"] = bool(new.numel()) and int(new[-1]) == self.tokenizer.eos_token_id
        except Exception as err:  # surfaced to the caller after the stream ends
            result["error"] = err
            streamer.end()

    async def pause(self) -> None:
        await self._lock.acquire()

    async def reload(self, model_dir: Path, changed: set[str] | None = None) -> None:
        """Loads every tensor whatever `changed` says: `load_state_dict` of a small model costs little."""
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


class _Cancelled:
    """A stopping criterion (transformers calls it after every token): true once the request was cancelled."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)


def _stop_at(text: str, stops: list[str]) -> str | None:
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None
