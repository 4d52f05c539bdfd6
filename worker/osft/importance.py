"""Per-layer importance from the new task's activations, and the protected ratio it buys.

The score follows the paper (after AdaSVD): the mean cosine similarity between what goes
into a block and what comes out of it, over the task's (non-padding) tokens. We score each
decoder layer (its residual-stream input against its output, which share a dimension) and
give every target matrix of that layer the layer's score; matrices outside any decoder layer
get the mean. The ratio is the mean protected ratio scaled by score / mean score, clipped to
[min, max]: a layer that changes its input little is protected more.
"""

from __future__ import annotations

import re

import torch

from sculptor.capacity import OSFTConfig, layer_index
from worker.training.device import to_device

_DECODER_LAYER = re.compile(r"layers\.(\d+)$")


def layer_importance(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[int, float]:
    """Mean input/output cosine similarity of each decoder layer over the batches' tokens."""
    layers = {int(m.group(1)): module for name, module in model.named_modules()
              if (m := _DECODER_LAYER.search(name))}
    sums = {index: 0.0 for index in layers}
    count = 0
    mask: torch.Tensor | None = None

    def hook(index: int):
        def record(_module, args, output):
            hidden_in = args[0]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            sums[index] += float(cos[mask].sum())
        return record

    handles = [module.register_forward_hook(hook(index)) for index, module in layers.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = to_device(batch, device)
                mask = batch["attention_mask"].bool()
                count += int(mask.sum())
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {index: total / max(1, count) for index, total in sums.items()}


def protected_ratios(names: list[str], importance: dict[int, float], config: OSFTConfig) -> dict[str, float]:
    """Protected ratio per matrix name: uniform, or scaled by its layer's normalised importance."""
    if not config.adaptive_ranks or not importance:
        return {name: config.mean_protected_ratio for name in names}
    mean = sum(importance.values()) / len(importance)
    ratios = {}
    for name in names:
        score = importance.get(layer_index(name), mean) / mean if mean > 0 else 1.0
        ratio = config.mean_protected_ratio * score
        ratios[name] = min(config.max_protected_ratio, max(config.min_protected_ratio, ratio))
    return ratios


def matrix_importance(names: list[str], importance: dict[int, float]) -> dict[str, float | None]:
    """The layer score each matrix was given (None where no score exists)."""
    return {name: importance.get(layer_index(name)) for name in names}
