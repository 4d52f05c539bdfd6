"""vLLM in-process (AsyncLLM), the default engine.

Why in-process rather than vLLM's own OpenAI server behind the gateway: the gateway then owns the
swap directly (pause/reload/resume are method calls, not dev-mode HTTP endpoints that must never
leave loopback), there is no second HTTP hop on every token, and version bookkeeping cannot drift
between two processes. AsyncLLM still runs the model in its own engine-core process.
"""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path
from typing import AsyncIterator

from service.engines.amx import check_engine_settings
from service.engines.base import Chunk, SamplingOptions
from service.engines.vllm_openai import VLLMOpenAI


class VLLMEngine:
    name = "vllm"

    def __init__(self, dtype: str, max_model_len: int, max_num_seqs: int, enforce_eager: bool,
                 kv_cache_gib: int = 2, pause_mode: str = "keep", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, tool_call_parser: str | None = None,
                 json_without_whitespace: bool = False):
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.enforce_eager = enforce_eager
        self.kv_cache_gib = kv_cache_gib
        self.pause_mode = pause_mode
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization  # ignored by the CPU backend
        self.tool_call_parser = tool_call_parser
        self.json_without_whitespace = json_without_whitespace
        self.llm = None
        self.openai: VLLMOpenAI | None = None  # vLLM's OpenAI serving layer on this engine (/v1 routes)
        # Salts the prefix cache per weights load: a block computed by earlier weights is never reused,
        # even when the cache reset after a reload cannot free the blocks of requests still in flight.
        self.weights_load = 0

    async def start(self, model_dir: Path) -> None:
        import os

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))  # read by the CPU backend only
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu():
            check_engine_settings(self.dtype)  # refuses, with the fix, what would SIGILL on the first request

        args = AsyncEngineArgs(
            model=str(model_dir), dtype=self.dtype, max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs, enforce_eager=self.enforce_eager, disable_log_stats=True,
            seed=0, tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            worker_extension_cls="service.engines.vllm_worker.SculptorWorkerExtension",
            **self._structured_outputs(),
        )
        self.llm = AsyncLLM.from_engine_args(args)
        self.openai = await VLLMOpenAI.build(self.llm, model_dir, self.tool_call_parser)

    def _structured_outputs(self) -> dict:
        """JSON outputs without free whitespace (xgrammar's compact separators) when asked; vLLM's defaults otherwise."""
        if not self.json_without_whitespace:
            return {}
        from vllm.config import StructuredOutputsConfig

        return {"structured_outputs_config": StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)}

    async def generate(self, prompt_ids: list[int], options: SamplingOptions, request_id: str) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
            stop=options.stop or None, seed=options.seed,
        )
        sent = 0
        prompt = TokensPrompt(prompt_token_ids=prompt_ids, cache_salt=str(self.weights_load))
        # Closed with this generator: AsyncLLM aborts the request when its generator is cancelled or closed.
        async with aclosing(self.llm.generate(prompt, params, request_id=request_id)) as outputs:
            async for out in outputs:
                completion = out.outputs[0]
                delta = completion.text[sent:]
                sent = len(completion.text)
                if out.finished:
                    yield Chunk(delta, completion.finish_reason or "stop", len(prompt_ids), len(completion.token_ids))
                elif delta:
                    yield Chunk(delta)

    def running_requests(self) -> int:
        return self.llm.get_num_unfinished_requests() if self.llm is not None else 0

    async def pause(self) -> None:
        # "keep" freezes in-flight requests in the queue (they continue after resume); "wait" lets them finish.
        await self.llm.pause_generation(mode=self.pause_mode, clear_cache=False)

    async def reload(self, model_dir: Path, changed: set[str] | None = None) -> None:
        self.weights_load += 1
        tensors = sorted(changed) if changed is not None else None
        await self.llm.collective_rpc("reload_checkpoint", kwargs={"weights_path": str(model_dir), "tensors": tensors})
        await self.llm.reset_prefix_cache()  # frees the old weights' cached blocks, unless requests still hold them

    async def resume(self) -> None:
        await self.llm.resume_generation()

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm, self.openai = None, None
