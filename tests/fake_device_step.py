"""One job of the worker's real code on a fake accelerator; tests/test_train_device.py runs it in its own process.

    python tests/fake_device_step.py MODEL_DIR REDIS_URL STORE_DIR      # prints a JSON line

The device is PyTorch's PrivateUse1 backend, registered from Python as "accel", under FakeTensorMode:
tensors there have a shape and a device but no values, and any op that mixes an accel tensor with a CPU
tensor (other than a 0-d scalar) raises, as it would on a GPU. So a `.to(device)` missing anywhere in
importance, the registry's bases, the task memory, the projectors, the training loop or the gate's
scoring fails this run; and what comes back from the device inside a training step is counted (the loss
scalar should be all). Why not a fake "cuda": on a CPU-only build autograd aborts the whole process on
one (it looks for a CUDA device guard). Why not "meta": fake mode lets meta tensors mix with CPU ones.
Its own process because the backend's registration cannot be undone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.backend_registration import _DummyBackendModule, _setup_privateuseone_for_python_backend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _NotAvailable(_DummyBackendModule):
    def is_available(self) -> bool:  # so fake mode never tries to run a real kernel there
        return False


_setup_privateuseone_for_python_backend("accel", backend_module=_NotAvailable())
ACCEL = torch.device("accel", 0)
# Under inference mode `torch.tensor(..., device=accel)` (transformers' KV cache) allocates for real, which
# the fake backend cannot: the gate's methods get no_grad instead (set before the worker is imported).
torch.inference_mode = lambda mode=True: torch.no_grad()


class Placeholders(TorchDispatchMode):
    """Fake tensors hold no values: the few ops that read one get a stand-in (every scalar 1, every mask all
    true). `reads` counts what comes back from the device: scalars read and copies to the CPU."""

    reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu"
        if func is torch.ops.aten._to_copy.default and on_device and kwargs.get("device") == torch.device("cpu"):
            self.reads += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += on_device
            return True if args[0].dtype == torch.bool else 1.0 if args[0].is_floating_point() else 1
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            indices = []
            for index in args[1]:
                if index is None or index.dtype != torch.bool:
                    indices.append(index)
                    continue
                grid = torch.meshgrid(*(torch.arange(n, device=index.device) for n in index.shape), indexing="ij")
                indices += [g.reshape(-1) for g in grid]
            return func(args[0], indices)
        return func(*args, **kwargs)


def main(model_dir: Path, redis_url: str, store_dir: Path) -> dict:
    import redis

    from sculptor.datasets import Hyperparameters
    from sculptor.storage import ObjectStore
    from worker import osft
    from worker.gates.generation import HFGenerator
    from worker.training.data import TokenizedExample, make_batches, tokenize_chat
    from worker.training.device import load_model, use_bf16
    from worker.training.loop import train

    stored: dict[str, torch.device] = {}

    class FakeJobRegistry(osft.SubspaceRegistry):
        """The stored bases come off disk as real CPU tensors, as on a GPU machine; a fake tensor has no
        values to write, so of those the fake job stores only the device is noted."""

        def load_stored(self, version, names):
            with unset_fake_temporarily():
                return super().load_stored(version, names)

        def store_bases(self, version, bases):
            stored.update({f"{name}.{part}": getattr(b, part).device for name, b in bases.items()
                           for part in ("U", "S", "Vh", "memory") if getattr(b, part) is not None})
            return f"file:///nowhere/{version}"

    registry = osft.SubspaceRegistry(redis.Redis.from_url(redis_url, decode_responses=True),
                                     ObjectStore(store_dir.as_uri()))
    fake_job_registry = FakeJobRegistry(registry.redis, registry.store)
    conversations = [[{"role": "user", "content": f"copy {w}"}, {"role": "assistant", "content": f"{w} {w}"}]
                     for w in "model learns new tasks without forgetting".split()]
    # A real job on the CPU first, so the fake one finds bases and a task memory in the registry.
    model, tokenizer = load_model(model_dir)
    batches = make_batches([tokenize_chat(tokenizer, c, 64) for c in conversations], 3, 1, tokenizer.pad_token_id)
    constraint = osft.build_constraint(model, Hyperparameters(), "v0", registry, batches[:1])
    osft.record_version(registry, model, "v1", "v0", "task-1", constraint, memory_batches=batches)

    unpadded = make_batches([TokenizedExample([5] * 16, [5] * 16)] * 2, 2, 1, tokenizer.pad_token_id)
    placeholders = Placeholders()
    with FakeTensorMode(allow_non_fake_inputs=True), placeholders:
        model, _ = load_model(model_dir, ACCEL)
        constraint = osft.build_constraint(model, Hyperparameters(), "v1", fake_job_registry, batches)
        result = train(model, batches[:1], constraint, learning_rate=1e-3, steps_per_epoch=1,
                       bf16_autocast=use_bf16(None, ACCEL))
        placeholders.reads = 0
        train(model, unpadded, constraint, learning_rate=1e-3, steps_per_epoch=1, bf16_autocast=False)
        reads_in_a_step = placeholders.reads  # transformers read a padded batch's mask back: none here
        osft.record_version(fake_job_registry, model, "v2", "v1", "task-2", constraint, memory_batches=batches)
        generator = HFGenerator.from_pretrained(model_dir, device=ACCEL)
        generator.answer_losses([c[:1] for c in conversations], [c[1]["content"] for c in conversations])
        generator.perplexity(["a model learns new tasks"])
        generator.generate([c[:1] for c in conversations], max_new_tokens=4)
        return {
            "registry_hit": constraint.registry_hit,
            "steps": result.steps,
            "reads_in_a_step": reads_in_a_step,
            "weights": sorted({str(p.device) for p in model.parameters()}),
            "projector_bases": sorted({str(side.basis.device) for p in constraint.projectors.values()
                                       for side in (p.left, p.right)}),
            "memory": sorted({str(m.device) for m in constraint.memory.values() if m is not None}),
            "stored": sorted({str(device) for device in stored.values()}),
            "stored_memory": sum(key.endswith(".memory") for key in stored),
            "gate_model": str(generator.device),
        }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))))
