"""Memory per GPU of one SVD-constrained training job under FSDP (the arithmetic behind deploy/README.md),
and a FLOP/byte model of one job on one GPU (the figures bench/gpu_check.sh measures).

    python deploy/memory_estimate.py             # Llama-2-7B and Llama-3-70B on 8 GPUs
    python deploy/memory_estimate.py --gpus 32
    python deploy/memory_estimate.py --single-gpu    # JSON: step time, projection share, memory on one H200

GB = 1e9 bytes. What `worker/training/distributed.py` holds: fp32 master weights, gradients and AdamW
m, v sharded by rows; per target matrix the left-side basis (rows of this shard) and the whole right-side
basis; each side the protected basis or its complement, whichever has fewer columns; bf16 compute copies
gathered one decoder layer at a time. No copy of the parent's weights: each step is projected against a
copy of one matrix's shard taken just before that matrix's AdamW step.
"""

from __future__ import annotations

import argparse
import json
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
    tied: bool = False  # lm_head shares the embeddings

    def matrices(self) -> list[tuple[int, int]]:
        """(out, in) of the target matrices of one layer: q, k, v, o, gate, up, down."""
        h, f, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]

    def frozen(self) -> int:
        """Embeddings and lm_head (untied) and the norms."""
        return (1 if self.tied else 2) * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden


LLAMA_7B = Model("Llama-2-7B", 4096, 11008, 32, 32000, 4096)
LLAMA_70B = Model("Llama-3-70B", 8192, 28672, 80, 128256, 1024)
LLAMA_1B = Model("random Llama ~1B (bench/gpu_check.py)", 2048, 8192, 16, 32000, 512, tied=True)


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


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense bf16 matrix products
    fp32_tflops: float  # fp32 without tensor cores: the projection's precision (TF32 off)
    tf32_tflops: float  # dense TF32 tensor cores (what the projection would get with TF32 on)
    bandwidth_tbs: float  # HBM, bytes read plus written


# 790 TFLOP/s and 4.3 TB/s measured on the H200s lent here (an 8192³ bf16 product; a device copy);
# fp32 and TF32 are NVIDIA's figures for the H100/H200 SXM (the same chip).
H200 = GPU("H200", 790, 67, 495, 4.3)
STEP_EFFICIENCY = 0.45  # of the bf16 rate, a whole training step (norms, softmax, the loss, launches)
GEMM_EFFICIENCY = 0.75  # of the fp32 / TF32 rate, the projection's products (large, well shaped)
LAUNCH_S = 5e-6  # per kernel; the projection launches ~6 per matrix


def projection_flops(out: int, inp: int, ratio: float) -> int:
    """Multiply-adds × 2 of one `Projector.project_` (worker/osft/projector.py), branch by branch."""
    m = min(out, inp)
    k = round(ratio * m)
    left, left_complement = side_columns(out, m, k)
    right, right_complement = side_columns(inp, m, k)
    if right_complement:  # thin through Q_V: delta @ Q_V, the left side on out × c, back through Q_Vᵀ
        return 4 * out * inp * right + 4 * out * left * right
    if left_complement:
        return 4 * out * inp * left + 4 * left * inp * right
    return 4 * out * inp * (left + right)


def single_gpu(model: Model, gpu: GPU, batch: int, seq: int, ratio: float = 0.75, micro_batches: int = 1) -> dict:
    """One job on one GPU as worker/training/loop.py runs it: fp32 master weights, bf16 autocast, no
    activation checkpointing, AdamW, the projection after every optimizer step in full fp32. `micro_batches`
    of batch x seq tokens each add up to one update (SCULPTOR_TRAIN_MICRO_BATCH): the step's compute grows
    with them, its projection and memory do not."""
    tokens = batch * seq
    shapes = model.matrices()
    targets = model.layers * sum(o * i for o, i in shapes)
    lm_head = model.vocab * model.hidden
    attention = model.layers * 3.5 * 2 * batch * seq * seq * model.hidden  # causal SDPA; backward ≈ 2.5× forward
    train_flops = 6 * targets * tokens + 4 * lm_head * tokens + attention  # lm_head frozen: no weight gradient
    step_s = micro_batches * train_flops / (gpu.bf16_tflops * 1e12 * STEP_EFFICIENCY)
    flops = model.layers * sum(projection_flops(o, i, ratio) for o, i in shapes)
    bases = model.layers * sum(b[0] + b[1] for b in (bases_floats(o, i, ratio) for o, i in shapes))
    # Per element of each weight: the reference copy (8 B), delta = W − reference (12 B), the final addmm (8 B).
    moved = 28 * targets + 4 * bases
    memory_s = moved / (gpu.bandwidth_tbs * 1e12) + model.layers * len(shapes) * 6 * LAUNCH_S

    def projection_s(tflops: float) -> float:
        return flops / (tflops * 1e12 * GEMM_EFFICIENCY) + memory_s

    logits = tokens * model.vocab * (2 + 4 + 4)
    plain = {"fp32 weights": (targets + model.frozen()) * 4, "fp32 gradients": targets * 4,
             "AdamW m, v": targets * 8, "bf16 weight copies (autocast, saved for backward)": (targets + lm_head) * 2,
             "activations": tokens * model.layers * activation_bytes_per_token_layer(model) + logits}
    plain_gb = sum(plain.values()) / GB
    checkpointed = tokens * model.layers * model.hidden * 2 + tokens * activation_bytes_per_token_layer(model) + logits
    # What a 7B job needs to fit one GPU (the worker's loop does not checkpoint yet).
    checkpointed_gb = plain_gb + (checkpointed - plain["activations"]) / GB
    osft_gb = plain_gb + bases * 4 / GB
    full_precision, tf32 = projection_s(gpu.fp32_tflops), projection_s(gpu.tf32_tflops)
    return {
        "tokens": tokens, "train_tflop": round(train_flops / 1e12, 2), "projection_tflop": round(flops / 1e12, 2),
        "projection_gb_moved": round(moved / GB, 1), "plain_step_s": round(step_s, 4),
        "projection_s": round(full_precision, 4),
        "projection_share": round(full_precision / (step_s + full_precision), 3),
        "projection_share_if_tf32": round(tf32 / (step_s + tf32), 3),
        "memory_gb": {**{key: round(value / GB, 2) for key, value in plain.items()}, "bases": round(bases * 4 / GB, 2),
                      "plain_total": round(plain_gb, 1), "osft_total": round(osft_gb, 1),
                      "plain_total_with_activation_checkpointing": round(checkpointed_gb, 1)},
        "memory_ratio": round(osft_gb / plain_gb, 3),
    }


def single_gpu_report(gpu: GPU = H200) -> dict:
    """bench/gpu_check.sh's model and Llama-2-7B, at its 8 × 2048 tokens and the service's default batch
    (8 examples of at most 256 tokens, sculptor/config.py), each alone and as 8 micro-batches of one update."""
    return {
        "gpu": gpu.__dict__, "step_efficiency": STEP_EFFICIENCY, "gemm_efficiency": GEMM_EFFICIENCY,
        "models": {model.name: {f"{batch}x{seq}" + (f" x{micro} micro-batches" if micro > 1 else ""):
                                single_gpu(model, gpu, batch, seq, micro_batches=micro)
                                for batch, seq, micro in ((8, 2048, 1), (8, 256, 1), (8, 2048, 8), (8, 256, 8))}
                   for model in (LLAMA_1B, LLAMA_7B)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per GPU per micro-batch")
    parser.add_argument("--single-gpu", action="store_true", help="the one-GPU FLOP/byte model, as JSON")
    args = parser.parse_args()
    if args.single_gpu:
        print(json.dumps(single_gpu_report(), indent=1))
        return
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
