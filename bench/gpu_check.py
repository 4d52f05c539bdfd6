"""The prepared GPU check (bench/gpu_check.sh): one H200, under 8 minutes, offline, JSON on stdout.

Needs only torch, transformers, safetensors (and what they bring: numpy, fsspec, tokenizers): no vLLM,
no Redis, no Celery, no pydantic. The registry's Redis is a dict (`DictRedis`), the object store a local
directory, and the worker's pieces are called directly, in the order worker/pipeline.py calls them.

1. A random Llama of ~1B parameters (hidden 2048, 16 layers, head_dim 64, GQA 32/8, MLP 8192, vocab
   32000), built on the device and saved with `save_pretrained`, with the tiny BPE tokenizer of the tests.
2. `steps`: plain and constrained steps (`train`, the worker's loop) at 8 × 2048 and 8 × 256 tokens:
   step time, the projection's own time and share, peak memory, and the host-device syncs inside the
   steps (torch.cuda.set_sync_debug_mode: the loss scalar should be the only one). The constrained
   model's SVD runs here (`svd_s`) and its bases go to the registry.
3. `job`: the real pipeline pieces on the device, as a job on that parent: load, importance, the bases
   from the registry, training at the service's batches, the new version's bases and task memory, the
   gate's scoring (worker.gates.generation.HFGenerator: answer losses, perplexity, greedy generation),
   and the invariant measured on the trained weights.
4. `precision` (run before the job): how much of a projected update lands in protected directions with
   full fp32 products (what the optimizer uses) and with TF32.

Each part is written to `--out` as soon as it is measured, so a run cut short keeps what it measured.

    bash bench/gpu_check.sh                # the GPU run
    bash bench/gpu_check.sh --tiny         # a CPU smoke run of the same code on a tiny model
    bash bench/gpu_check.sh --size small   # CPU measurements on SmolLM2-shaped layers (minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# worker.gates' __init__ imports the gates' pydantic models; the check needs only the generator.
_gates = types.ModuleType("worker.gates")
_gates.__path__ = [str(ROOT / "worker" / "gates")]
sys.modules.setdefault("worker.gates", _gates)

from sculptor.storage import ObjectStore  # noqa: E402
from sculptor.tiny_model import build_tokenizer  # noqa: E402
from worker import osft  # noqa: E402
from worker.gates.generation import HFGenerator  # noqa: E402
from worker.osft.optimizer import ieee_fp32_matmul  # noqa: E402
from worker.training.data import TokenizedExample, make_batches, tokenize_chat  # noqa: E402
from worker.training.device import load_model, resolve_train_device, use_bf16  # noqa: E402
from worker.training.loop import train  # noqa: E402

FORBIDDEN = ("vllm", "celery", "redis", "pydantic")
SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab; the step shapes (batch, tokens)
    "1b": ((2048, 8192, 16, 32, 8, 32000), [(8, 2048), (8, 256)]),
    "small": ((576, 1536, 6, 9, 3, 49152), [(8, 128), (8, 32)]),  # SmolLM2-135M's layers: CPU measurements
    "tiny": ((128, 256, 2, 2, 2, 512), [(2, 64), (2, 16)]),
}


class DictRedis:
    """What SubspaceRegistry asks of Redis, in a dict (the GPU machine has no Redis)."""

    def __init__(self):
        self.values, self.scores = {}, {}

    def get(self, key):
        return self.values.get(key)

    def set(self, key, value):
        self.values[key] = value

    def zadd(self, key, mapping):
        self.scores.update(mapping)

    def zrange(self, key, start, end):
        return sorted(self.scores, key=self.scores.get)

    def pipeline(self):
        return self

    def execute(self):
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_model(out: Path, size: str, device: torch.device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads, vocab = SIZES[size][0]
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1B parameters on the host takes longer than the rest
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return {"params_M": round(params / 1e6, 1), "hidden": hidden, "intermediate": intermediate, "layers": layers,
            "heads": heads, "kv_heads": kv_heads, "vocab": vocab}


def chat_examples(count: int) -> list[list[dict]]:
    words = "model learns new tasks without forgetting old ones answer question reverse copy".split()
    return [[{"role": "user", "content": f"reverse {words[i % len(words)]} {words[(3 * i) % len(words)]}"},
             {"role": "assistant", "content": f"{words[(3 * i) % len(words)]} {words[i % len(words)]}"}]
            for i in range(count)]


def random_batches(count: int, batch: int, seq: int, vocab: int, pad_id: int):
    """Full-length batches of random tokens, every token learned (what a packed batch looks like)."""
    generator = torch.Generator().manual_seed(0)
    examples = [TokenizedExample(ids, ids) for ids in
                torch.randint(0, vocab, (count * batch, seq), generator=generator).tolist()]
    return make_batches(examples, batch, 1, pad_id)


class SyncCounter:
    """Host-device synchronisations inside a block (CUDA's sync debug mode warns at each), by source line."""

    def __init__(self, device: torch.device):
        self.device, self.sources = device, collections.Counter()

    def __enter__(self):
        if self.device.type == "cuda":
            self._warnings = warnings.catch_warnings(record=True)
            self._seen = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            for w in self._seen:
                if "synchroniz" in str(w.message):
                    self.sources[f"{Path(w.filename).name}:{w.lineno}"] += 1

    def report(self, steps: int) -> dict | None:
        if self.device.type != "cuda":
            return None  # sync debug mode exists on CUDA only
        return {"per_step": round(sum(self.sources.values()) / steps, 2), "sources": dict(self.sources.most_common(6))}


def projection_time(constraint, device: torch.device, repeats: int = 3) -> float:
    """Seconds of one step's projections (every constrained matrix once), in full fp32 as the optimizer does."""
    pairs = [(constraint.targets[name].weight, p) for name, p in constraint.projectors.items()]
    times = []
    with torch.no_grad(), ieee_fp32_matmul():
        for _ in range(repeats + 1):
            total = 0.0
            for weight, projector in pairs:
                reference = weight.detach().clone()
                moved = reference + 1e-3 * torch.randn_like(reference)
                sync(device)
                started = time.perf_counter()
                projector.project_(moved, reference)
                sync(device)
                total += time.perf_counter() - started
                del reference, moved
            times.append(total)
    return statistics.median(times[1:])


def measure_steps(model_dir: Path, registry, parent: str, device: torch.device, method: str,
                  shapes: list[tuple[int, int]], steps: int, warmup: int, vocab: int) -> dict:
    """Step time, peak memory and syncs of `method` ("full": plain fine-tuning of the same matrices)."""
    reset_peak(device)
    model, tokenizer = load_model(model_dir, device)
    hp = types.SimpleNamespace(method=method)
    constraint = osft.build_constraint(model, hp, parent, registry, [], config=osft.OSFTConfig(adaptive_ranks=False))
    bf16 = use_bf16(None, device)
    out = {}
    for batch, seq in shapes:
        batches = random_batches(warmup + steps, batch, seq, vocab, tokenizer.pad_token_id)
        train(model, batches[:warmup], constraint, 1e-6, warmup, bf16_autocast=bf16)
        reset_peak(device)
        with SyncCounter(device) as syncs:
            result = train(model, batches[warmup:], constraint, 1e-6, steps, bf16_autocast=bf16)
        out[f"{batch}x{seq}"] = {"step_s": round(result.mean_step_s, 4), "peak_gb": peak_gb(device),
                                 "syncs": syncs.report(steps)}
    if method == "osft":
        out["svd_s"] = round(constraint.timings.get("svd_s", float("nan")), 2)
        out["projection_s"] = round(projection_time(constraint, device), 4)
        out["bases_gb"] = round(sum(p.extra_numel() for p in constraint.projectors.values()) * 4 / 1e9, 3)
    del model, constraint
    return out


def protected_leak(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], bases, plans) -> float:
    """The largest of ‖U_kᵀ ΔW‖ and ‖ΔW V_k‖ relative to ‖ΔW‖ over the matrices (the invariant test: 1e-4)."""
    worst = 0.0
    for name, w0 in before.items():
        k, delta = plans[name].k, after[name] - w0
        size = float(delta.norm())
        U, Vh = bases[name].U.to(delta.device), bases[name].Vh.to(delta.device)
        with ieee_fp32_matmul():
            leak = max(float((U[:, :k].T @ delta).norm()), float((delta @ Vh[:k].T).norm()))
        worst = max(worst, leak / size if size else 0.0)
    return worst


def run_job(model_dir: Path, registry, device: torch.device, out_dir: Path, examples: int) -> dict:
    """One job of the pipeline's own pieces, timed (worker/pipeline.py: train_candidate, then the gates)."""
    timings = {}
    started = time.perf_counter()
    model, tokenizer = load_model(model_dir, device)
    sync(device)
    timings["model_load_s"] = time.perf_counter() - started
    conversations = chat_examples(examples)
    tokenized = [tokenize_chat(tokenizer, c, 256) for c in conversations]
    batches = make_batches(tokenized, 8, 2, tokenizer.pad_token_id)
    config = osft.OSFTConfig()
    constraint = osft.build_constraint(model, types.SimpleNamespace(method="osft"), "v0", registry, batches[:4],
                                       config=config)
    timings.update({key: value for key, value in constraint.timings.items()})  # load_s (registry hit), importance_s
    watched = list(constraint.projectors)[:4]
    before = {name: constraint.targets[name].weight.detach().clone() for name in watched}
    loaded = registry.load_bases("v0", before, {name: constraint.plans[name].k for name in watched})
    reset_peak(device)
    with SyncCounter(device) as syncs:
        result = train(model, batches, constraint, 3e-3, len(batches) // 2, bf16_autocast=use_bf16(None, device))
    leak = protected_leak(before, {n: constraint.targets[n].weight.detach() for n in watched}, loaded,
                          constraint.plans)
    started = time.perf_counter()
    record = osft.record_version(registry, model, "v1", "v0", "task-1", constraint, memory_batches=batches[:8])
    sync(device)
    timings["record_version_s"] = time.perf_counter() - started  # SVD of the new weights, task memory, store
    candidate = out_dir / "v1"
    model.save_pretrained(candidate)
    tokenizer.save_pretrained(candidate)
    del model, constraint, before, loaded
    reset_peak(device)
    started = time.perf_counter()
    generator = HFGenerator.from_pretrained(candidate, device=device)
    prompts, answers = [c[:1] for c in conversations[:16]], [c[1]["content"] for c in conversations[:16]]
    losses = generator.answer_losses(prompts, answers)
    perplexity = generator.perplexity(["a model learns new tasks without forgetting old ones"] * 8)
    texts = generator.generate(prompts[:8], max_new_tokens=16)
    sync(device)
    timings["gate_scoring_s"] = time.perf_counter() - started
    return {
        **{key: round(value, 3) for key, value in timings.items()},
        "train_steps": result.steps, "train_step_s": round(result.mean_step_s, 4), "final_loss": result.final_loss,
        "train_syncs": syncs.report(result.steps),
        "protected_leak_max": leak,
        "memory_directions": sum(m.memory_directions for m in record.matrices.values()),
        "gate": {"device": str(generator.device), "answer_losses": len(losses.nll),
                 "perplexity_texts": len(perplexity.nll), "generated": len(texts), "generated_tokens": generator.stats.generated_tokens,
                 "peak_gb": peak_gb(device)},
    }


def precision(device: torch.device, out_features: int, in_features: int) -> dict:
    """The protected part of one projected random update: full fp32 (the optimizer's) against TF32."""
    from worker.osft.projector import Projector
    from worker.osft.subspace import compute_bases

    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features, device=device) / in_features ** 0.5
    bases, k = compute_bases(weight), round(0.75 * min(weight.shape))
    projector = Projector(weight, bases, k)
    out = {}
    for name, mode in (("ieee", "ieee"), ("tf32", "tf32")):
        previous = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = mode
        try:
            moved = weight + 1e-3 * torch.randn_like(weight)
            projector.project_(moved, weight)
        finally:
            torch.backends.cuda.matmul.fp32_precision = previous
        delta = moved - weight
        with ieee_fp32_matmul():
            leak = max(float((bases.U[:, :k].T @ delta).norm()), float((delta @ bases.Vh[:k].T).norm()))
        out[f"{name}_leak"] = leak / float(delta.norm())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short batches: the CPU smoke run")
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--device", default="auto", help="as SCULPTOR_TRAIN_DEVICE (default auto)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    device = resolve_train_device(args.device)
    size = "tiny" if args.tiny else args.size
    shapes = SIZES[size][1]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "bf16_autocast": use_bf16(None, device)}
    started = time.perf_counter()

    def save() -> None:  # after every part, so a run cut short still leaves what it measured
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report["model"] = build_model(tmp / "v0", size, device)
        report["model"]["build_s"] = round(time.perf_counter() - started, 1)
        save()
        registry = osft.SubspaceRegistry(DictRedis(), ObjectStore((tmp / "store").as_uri()))
        report["steps"] = {}
        for method in ("full", "osft"):
            report["steps"][method] = measure_steps(tmp / "v0", registry, "v0", device, method, shapes,
                                                    args.steps, args.warmup, report["model"]["vocab"])
            save()
        hidden, intermediate = SIZES[size][0][:2]
        report["precision"] = precision(device, intermediate, hidden)
        report["job"] = run_job(tmp / "v0", registry, device, tmp, examples=128 if size == "1b" else 32)
        save()
    for batch, seq in shapes:
        key = f"{batch}x{seq}"
        plain, constrained = report["steps"]["full"][key], report["steps"]["osft"][key]
        report["steps"][key] = {
            "projection_share": round(report["steps"]["osft"]["projection_s"] / constrained["step_s"], 3),
            "step_ratio": round(constrained["step_s"] / plain["step_s"], 3),
            "memory_ratio": (round(constrained["peak_gb"] / plain["peak_gb"], 3) if plain["peak_gb"] else None),
        }
    report["imported"] = sorted(name for name in FORBIDDEN if name in sys.modules)
    report["total_s"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps(report, indent=1))
    if report["imported"]:
        raise SystemExit(f"the check imported {report['imported']}, which the GPU machine does not have")


if __name__ == "__main__":
    main()
