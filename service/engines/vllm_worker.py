"""Methods added to each vLLM worker process (vLLM's `worker_extension_cls`), called by name over
`collective_rpc`, so they run next to the model without pickling code across processes.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path

from safetensors import safe_open

# Logs "<Layer>: Failed to load weights" for every layer a partial reload leaves as it is.
LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class SculptorWorkerExtension:
    def reload_checkpoint(self, weights_path: str, tensors: list[str] | None = None) -> None:
        """vLLM's in-place `reload_weights` of the checkpoint, or of only the named `tensors` (those that
        changed), then refresh the kernel of a tied lm_head.

        Why the refresh: on the CPU backend the lm_head computes with a kernel made from its weight at load
        time (`dispatch_cpu_unquantized_gemm`: a oneDNN handle or a packed copy). When the lm_head is tied to
        the embeddings, the checkpoint has no lm_head tensor, so the layerwise reload never reprocesses
        it, and the head keeps multiplying by the *previous* version's embeddings. Measured on an AMX
        Xeon, fp32 and bf16: after a reload the head's logits differed from the new embeddings' by up to
        1.3, and greedy output matched neither version. Elsewhere this is a no-op.
        """
        model = self.model_runner.get_model()
        packed = getattr(model, "packed_modules_mapping", None)
        if tensors is None or packed is None:
            self.model_runner.reload_weights(weights_path=weights_path)
            embeddings_changed = True
        else:
            loaded = self._reload_layers_of(Path(weights_path), set(tensors), packed)
            embeddings_changed = any("embed_tokens" in name for name in loaded)
        head = getattr(model, "lm_head", None)
        tied = self.model_runner.model_config.hf_config.get_text_config().tie_word_embeddings
        if head is not None and tied and embeddings_changed:
            head.quant_method.process_weights_after_loading(head)

    def _reload_layers_of(self, weights_path: Path, changed: set[str], packed: dict[str, list[str]]) -> list[str]:
        """Reload every tensor of each vLLM layer that holds a changed tensor; the other layers keep their
        weights (vLLM's layerwise reload puts back the kernel tensors of a layer it was given nothing for).

        A fused layer (qkv_proj, gate_up_proj) is reloaded whole: given only some of its parts, vLLM would
        process it with the others left uninitialised.
        """
        dtype = self.model_runner.model_config.dtype
        wanted = {_vllm_layer(name, packed) for name in changed}
        with ExitStack() as stack:
            handles = [stack.enter_context(safe_open(str(path), "pt")) for path in sorted(weights_path.glob("*.safetensors"))]
            names = [(name, h) for h in handles for name in h.keys() if _vllm_layer(name, packed) in wanted]
            # Cast here: the loader would cast anyway, with one warning per tensor.
            weights = ((name, h.get_tensor(name).to(dtype)) for name, h in names)
            with _quiet(LAYERWISE_LOGGER):
                self.model_runner.reload_weights(weights_iterator=weights)
        return [name for name, _ in names]


def _vllm_layer(name: str, packed: dict[str, list[str]]) -> str:
    """The vLLM layer a checkpoint tensor loads into: "model.layers.0.self_attn.k_proj.weight" ->
    "model.layers.0.self_attn.qkv_proj"; an unfused one is its own module, "model.norm"."""
    module = name.rsplit(".", 1)[0]
    parent, _, leaf = module.rpartition(".")
    for fused, parts in packed.items():
        if leaf in parts:
            return f"{parent}.{fused}"
    return module


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
