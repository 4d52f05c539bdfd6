"""Memory per GPU of one SVD-constrained training job under FSDP (the arithmetic behind deploy/README.md).

    python deploy/memory_estimate.py             # Llama-2-7B and Llama-3-70B on 8 GPUs
    python deploy/memory_estimate.py --gpus 32

GB = 1e9 bytes. What `worker/training/distributed.py` holds: fp32 master weights, gradients and AdamW
m, v sharded by rows; per target matrix the left-side basis (rows of this shard) and the whole right-side
basis; each side the protected basis or its complement, whichever has fewer columns; bf16 compute copies
gathered one decoder layer at a time. No copy of the parent's weights: each step is projected against a
copy of one matrix's shard taken just before that matrix's AdamW step.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_dim: int  # hidden size of k and v (grouped-query attention: kv heads × head dim)

    def matrices(self) -> list[tuple[int, int]]:
        """(out, in) of the target matrices of one layer: q, k, v, o, gate, up, down."""
        h, f, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]

    def frozen(self) -> int:
        """Embeddings and lm_head (untied) and the norms."""
        return 2 * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden


LLAMA_7B = Model("Llama-2-7B", 4096, 11008, 32, 32000, 4096)
LLAMA_70B = Model("Llama-3-70B", 8192, 28672, 80, 128256, 1024)


def side_columns(dim: int, m: int, k: int) -> tuple[int, bool]:
    """Columns one side keeps, and whether they are the complement (it exists only where dim == m)."""
    if dim == m and m - k < k:
        return m - k, True
    return k, False


def bases_floats(out: int, inp: int, ratio: float) -> tuple[int, int, int]:
    """Floats of the left side, the right side, and of the projection's all-reduce block, for one matrix."""
    m = min(out, inp)
    k = round(ratio * m)
    left, _ = side_columns(out, m, k)
    right, right_complement = side_columns(inp, m, k)
    reduced = left * (right if right_complement else inp)  # worker/osft/sharded.py: right side first
    return out * left, inp * right, reduced


def activation_bytes_per_token_layer(model: Model) -> int:
    """What autograd keeps per token in one decoder layer (bf16; the norms keep an fp32 copy of their input)."""
    h, f, kv = model.hidden, model.intermediate, model.kv_dim
    attention = 5 * h + 3 * kv  # norm in/out, q k v, rotated q k, attention output (SDPA: no s × s scores)
    mlp = 2 * h + 4 * f         # norm in/out, gate, up, silu(gate), product
    return 2 * (attention + mlp) + 2 * 4 * h


def estimate(model: Model, gpus: int, tokens: int, ratio: float = 0.75) -> dict[str, float]:
    """GB per GPU, by item (see the module docstring for what is sharded)."""
    shapes = model.matrices()
    target = model.layers * sum(o * i for o, i in shapes)
    per_matrix = [bases_floats(o, i, ratio) for o, i in shapes]
    left = model.layers * sum(b[0] for b in per_matrix)
    right = model.layers * sum(b[1] for b in per_matrix)
    reduced = model.layers * sum(b[2] for b in per_matrix)
    largest_right = max(b[1] for b in per_matrix)
    layer = sum(o * i for o, i in shapes)
    per_token_layer = activation_bytes_per_token_layer(model)
    logits = tokens * model.vocab * (2 + 4 + 4)  # bf16 logits, their fp32 copy for the loss, its gradient
    return {
        "target_params_B": target / 1e9,
        "fp32 master weights": (target + model.frozen()) * 4 / gpus / GB,
        "fp32 gradients": target * 4 / gpus / GB,
        "AdamW m, v (fp32)": target * 8 / gpus / GB,
        "step reference: one matrix's shard (fp32)": max(o * i for o, i in shapes) * 4 / gpus / GB,
        "bases, left side (rows of the shard)": left * 4 / gpus / GB,
        "bases, right side, resident": right * 4 / GB,
        "bases, right side, sharded + one gathered": (right / gpus + largest_right) * 4 / GB,
        "gathered layers (2 bf16) + one layer's fp32 gradient": layer * (2 * 2 + 4) / GB,
        "gathered root (bf16 embeddings, lm_head)": model.frozen() * 2 / GB,
        "activations, checkpointing": (tokens * model.layers * model.hidden * 2 + tokens * per_token_layer
                                        + logits) / GB,
        "activations, no checkpointing": (tokens * model.layers * per_token_layer + logits) / GB,
        "all-reduce per step (fp32)": reduced * 4 / GB,
        "bases_floats_B": (left + right) / 1e9,
    }


def totals(e: dict[str, float], resident_right: bool) -> tuple[float, float]:
    """Total per GPU with and without activation checkpointing."""
    common = sum(e[key] for key in ("fp32 master weights", "fp32 gradients", "AdamW m, v (fp32)",
                                    "step reference: one matrix's shard (fp32)",
                                    "bases, left side (rows of the shard)",
                                    "gathered layers (2 bf16) + one layer's fp32 gradient",
                                    "gathered root (bf16 embeddings, lm_head)"))
    common += e["bases, right side, resident" if resident_right else "bases, right side, sharded + one gathered"]
    return common + e["activations, checkpointing"], common + e["activations, no checkpointing"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per GPU per micro-batch")
    args = parser.parse_args()
    for model in (LLAMA_7B, LLAMA_70B):
        e = estimate(model, args.gpus, args.tokens)
        print(f"{model.name} on {args.gpus} GPUs, {args.tokens} tokens per GPU")
        for key, value in e.items():
            print(f"  {key:55s} {value:8.2f}")
        for resident in (True, False):
            ckpt, no_ckpt = totals(e, resident)
            print(f"  total, right side {'resident' if resident else 'sharded':8s}: "
                  f"{ckpt:6.1f} GB with checkpointing, {no_ckpt:6.1f} without")


if __name__ == "__main__":
    main()
