"""vLLM's own OpenAI serving layer on one replica's in-process engine.

The `/v1` routes hand each request to vLLM's `OpenAIServingChat`, `OpenAIServingCompletion` and
`ServingTokenization`, built by vLLM's own `init_app_state` exactly as `vllm serve` builds them, so
everything vLLM's server accepts (content parts, `n`, logprobs, tools, structured outputs, `echo`,
token-id prompts) behaves here as it does there. Sculptor adds only what is its own, around the call
(service/api/routes/openai.py): auth, limits, replica routing, admission during a swap, the version label.

The served model name of a replica is the version it holds (`serve_as`, called on every swap), so
vLLM itself writes that version into every answer's and every chunk's `model` field.
"""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

from service import metrics


class CountedEngineClient:
    """The AsyncLLM as vLLM's serving layer sees it, counting every request's tokens into /metrics.

    The serving layer streams DELTA outputs (or one FINAL_ONLY output), so summing the token ids of
    every output counts each completion token once, whatever `n` is.
    """

    def __init__(self, llm):
        self._llm = llm

    def __getattr__(self, name):
        return getattr(self._llm, name)

    async def generate(self, *args, **kwargs):
        prompt_counted = False
        async with aclosing(self._llm.generate(*args, **kwargs)) as outputs:
            async for out in outputs:
                if not prompt_counted and out.prompt_token_ids is not None:
                    metrics.TOKENS.labels(kind="prompt").inc(len(out.prompt_token_ids))
                    prompt_counted = True
                metrics.TOKENS.labels(kind="completion").inc(sum(len(o.token_ids) for o in out.outputs))
                yield out


class VLLMOpenAI:
    """vLLM's serving classes for one engine, under the name of the version that engine holds."""

    def __init__(self, state, model_dir: Path):
        self.state = state
        self.model_dir = model_dir

    @classmethod
    async def build(cls, llm, model_dir: Path, tool_call_parser: str | None) -> "VLLMOpenAI":
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        argv = ["--model", str(model_dir), "--served-model-name", "current"]
        if tool_call_parser:  # tool_choice "auto" and "required" need a parser for the model's tool-call format
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", tool_call_parser]
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        state = State()
        await init_app_state(CountedEngineClient(llm), state, args, await llm.get_supported_tasks())
        return cls(state, model_dir)

    def serve_as(self, version: str) -> None:
        from vllm.entrypoints.openai.models.protocol import BaseModelPath

        self.state.openai_serving_models.base_model_paths = [BaseModelPath(name=version,
                                                                           model_path=str(self.model_dir))]

    async def chat(self, request, raw_request):
        return await self.state.openai_serving_chat.create_chat_completion(request, raw_request)

    async def completion(self, request, raw_request):
        return await self.state.openai_serving_completion.create_completion(request, raw_request)

    async def tokenize(self, request, raw_request):
        return await self.state.serving_tokenization.create_tokenize(request, raw_request)

    async def detokenize(self, request, raw_request):
        return await self.state.serving_tokenization.create_detokenize(request, raw_request)
