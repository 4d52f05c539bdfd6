"""The engine interface: one model version loaded, streamed generation, and an in-place reload.

Two implementations: vLLM (`vllm_engine.py`, the default where importable) and transformers
(`hf_engine.py`, the fallback). The swap protocol (verify, pause, reload, resume, roll back)
lives in `service/hotswap.py`, once, for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Protocol


@dataclass
class SamplingOptions:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Chunk:
    """A piece of streamed output; the last one carries `finish_reason` and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class PromptTooLong(ValueError):
    pass


class EmptyPrompt(ValueError):
    pass


class Engine(Protocol):
    name: str
    max_model_len: int
    openai: Any  # vLLM's OpenAI serving layer on this engine (service/engines/vllm_openai.py), or None

    async def start(self, model_dir: Path) -> None: ...

    def generate(self, prompt_ids: list[int], options: SamplingOptions, request_id: str) -> AsyncIterator[Chunk]:
        """Stream the answer; closing or cancelling the iterator ends the request in the engine."""
        ...

    def running_requests(self) -> int:
        """Requests the engine is generating (or holds queued) now."""
        ...

    async def pause(self) -> None: ...

    async def reload(self, model_dir: Path, changed: set[str] | None = None) -> None:
        """Load `model_dir`'s weights in place. `changed` names the tensors that differ from the weights
        loaded now; an engine may reload only those (None: all of them)."""
        ...

    async def resume(self) -> None: ...

    async def shutdown(self) -> None: ...
