"""Methods added to each vLLM worker process (vLLM's `worker_extension_cls`), called by name over
`collective_rpc`, so they run next to the model without pickling code across processes.
"""

from __future__ import annotations


class SculptorWorkerExtension:
    def reload_checkpoint(self, weights_path: str) -> None:
        """vLLM's in-place `reload_weights`, then refresh the kernel of a tied lm_head.

        Why: on the CPU backend the lm_head computes with a kernel made from its weight at load time
        (`dispatch_cpu_unquantized_gemm`: a oneDNN handle or a packed copy). When the lm_head is tied to
        the embeddings, the checkpoint has no lm_head tensor, so the layerwise reload never reprocesses
        it, and the head keeps multiplying by the *previous* version's embeddings. Measured on an AMX
        Xeon, fp32 and bf16: after a reload the head's logits differed from the new embeddings' by up to
        1.3, and greedy output matched neither version. Elsewhere this is a no-op.
        """
        self.model_runner.reload_weights(weights_path=weights_path)
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        if head is not None and self.model_runner.model_config.hf_config.get_text_config().tie_word_embeddings:
            head.quant_method.process_weights_after_loading(head)
