"""One training job over several processes: FSDP2 (`fully_shard`) with the SVD constraint on sharded weights.

Launch one process per GPU (or, on CPU, per core group) with torchrun:

    torchrun --standalone --nproc-per-node 8 -m worker.training.distributed \\
        --model-dir PARENT_DIR --batches batches.pt --out-dir CANDIDATE_DIR --learning-rate 3e-4

`batches.pt` is `torch.save` of the job's global batches (what `worker.training.data.make_batches`
returns). Every rank loads the parent model, the plan (protected ranks) is made once on rank 0, the model
is sharded, the SVDs are spread over the ranks (one matrix at a time), each rank trains on its rows of every global batch
with the unchanged loop (`worker.training.loop.train`), and rank 0 writes the gathered checkpoint.
NCCL on GPUs, gloo on CPU; FSDP2 runs on both (tests/test_distributed_training.py runs 2 CPU processes).

A job of the queue (SCULPTOR_TRAIN_GPUS > 1, worker/training/sharded_round.py) passes `--round` instead:
a `torch.save`d dict with the batches, the job's plans (the parent's rank floors from the registry), the
parent's bases with the task memory, the constraint's config and the schedule. Then no rank plans or runs
an SVD: every rank reads the same bases, so they are bitwise equal on all of them. Rank 0 appends each
progress report to `--progress` (JSON lines) and writes the result to `--out-dir`/training.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from sculptor.capacity import OSFTConfig
from sculptor.subspace_records import SubspaceRecord
from worker.osft.constraint import MatrixPlan, plan_matrices, require_capacity
from worker.osft.importance import layer_importance
from worker.osft.sharded import (
    ShardedProjector,
    ShardedSubspaceConstraint,
    mark_trainable,
)
from worker.osft.subspace import Bases, compute_bases, target_modules
from worker.training.data import IGNORE_INDEX
from worker.training.loop import LRSchedule, TrainResult, train

# A collective that waits longer than this ends the rank with an error instead of hanging (a lost peer).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def init_distributed(init_method: str = "env://", rank: int | None = None,
                     world_size: int | None = None) -> DeviceMesh:
    """Join the process group (torchrun's environment by default) and return a 1-D mesh over all ranks."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {} if rank is None else {"rank": rank, "world_size": world_size}
    dist.init_process_group(backend, init_method=init_method, timeout=COLLECTIVE_TIMEOUT, **kwargs)
    return init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))


def split_batch(batch: dict[str, torch.Tensor], rank: int, world: int,
                device: torch.device) -> dict[str, torch.Tensor | float]:
    """This rank's rows of a global batch, with the loss normalised so the ranks together match one process.

    Each rank's loss is its summed token loss divided by (global label tokens / world); FSDP averages
    gradients over ranks, so the result is the gradient of the global batch's mean token loss, however
    unevenly the label tokens fall on the ranks. A rank left without rows (a short last batch) runs one
    row with no labels: it adds nothing but still takes part in FSDP's collectives.
    """
    labels = batch["labels"]
    label_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the model shifts labels by one
    rows = torch.arange(labels.shape[0]).tensor_split(world)[rank]
    part = {key: value[rows if len(rows) else [0]] for key, value in batch.items()}
    if not len(rows):
        part["labels"] = torch.full_like(part["labels"], IGNORE_INDEX)
    part = {key: value.to(device) for key, value in part.items()}
    # A float, not a tensor: FSDP's mixed precision would cast a float tensor argument to bf16.
    part["num_items_in_batch"] = max(1, label_tokens) / world
    return part


def plan_on_rank0(model: torch.nn.Module, targets: dict[str, torch.nn.Linear],
                  importance_batches: list[dict[str, torch.Tensor]], parent_record: SubspaceRecord | None,
                  config: OSFTConfig) -> dict[str, MatrixPlan]:
    """Protected ranks, decided once (the importance pass runs on rank 0) and sent to every rank."""
    plans = None
    if dist.get_rank() == 0:
        importance = layer_importance(model, importance_batches) if config.adaptive_ranks else {}
        shapes = {name: tuple(module.weight.shape) for name, module in targets.items()}
        plans = plan_matrices(shapes, importance, parent_record, config)
    box = [plans]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_bases(weight: DTensor, owner: int, device: torch.device) -> Bases:
    """The SVD of one sharded weight, computed by rank `owner` and sent to all ranks.

    Every rank must hold bitwise the same bases (the left side sums U rows from all ranks, and singular
    vectors are only defined up to sign), so no rank may compute its own copy. Callers give each matrix
    its own owner to spread the SVDs; only one matrix's full weight and bases exist at a time.
    """
    full = weight.detach().full_tensor()  # a collective: every rank takes part
    if dist.get_rank() == owner:
        bases = compute_bases(full.to(device))
    else:
        out, inp = full.shape
        m = min(out, inp)
        bases = Bases(torch.empty(out, m, device=device), torch.empty(m, device=device),
                      torch.empty(m, inp, device=device))
    for tensor in (bases.U, bases.S, bases.Vh):
        dist.broadcast(tensor, src=owner)
    return bases


def build_projectors(targets: dict[str, torch.nn.Linear], plans: dict[str, MatrixPlan], device: torch.device,
                     shard_right: bool, config: OSFTConfig,
                     given: dict[str, Bases] | None = None) -> dict[str, ShardedProjector]:
    """A projector for every target that trains under protection, from the sharded weights: with the `given`
    bases (the same on every rank: the parent's, from the registry, with its task memory), else an SVD."""
    names = [name for name, plan in plans.items() if not plan.spent and plan.k > 0]
    projectors = {}
    for i, name in enumerate(names):
        weight = targets[name].weight
        if given is not None:
            bases = given[name].to(device)
        else:
            bases = broadcast_bases(weight, owner=i % dist.get_world_size(), device=device)
        memory = bases.memory if config.task_memory else None
        projectors[name] = ShardedProjector(weight, bases, plans[name].k, shard_right, memory, config.memory_share)
        plans[name].memory_rank = projectors[name].memory_rank
    return projectors


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, bf16_params: bool) -> None:
    """FSDP2: each decoder layer is one unit (gathered for its forward and backward), the rest the root.

    With `bf16_params` (GPUs) the gathered compute copies are bf16 and gradients are reduced in fp32; the
    sharded master weights, gradients and Adam states stay fp32, which the constraint needs.
    """
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16_params else MixedPrecisionPolicy())
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def train_sharded(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    mesh: DeviceMesh,
    learning_rate: float,
    steps_per_epoch: int,
    method: str = "osft",
    config: OSFTConfig | None = None,
    parent_record: SubspaceRecord | None = None,
    importance_steps: int = 4,
    bf16: bool = False,
    shard_right_bases: bool = False,
    activation_checkpointing: bool = False,
    plans: dict[str, MatrixPlan] | None = None,
    bases: dict[str, Bases] | None = None,
    schedule: LRSchedule = LRSchedule(),
    on_progress=None,
) -> tuple[TrainResult, ShardedSubspaceConstraint]:
    """Plan, shard and train `model` (full, fp32, the same on every rank) on the global `batches`.

    Returns the loop's result (losses are the global batch's mean token loss) and the constraint.
    method "full" trains the same matrices without projection (the baseline of `worker.osft.full`).
    `shard_right_bases`: keep 1/N of each right-side basis per rank and gather it per matrix (large models).
    `activation_checkpointing`: keep only each decoder layer's input and recompute the rest in backward.
    `plans` and `bases` (a job's round: the same on every rank) replace the planning and the SVDs.
    """
    config = config or OSFTConfig()
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device("cpu")
    targets = target_modules(model, config)
    if plans is None and method == "osft":  # (a job's round brings its plans: sharded_round.py)
        plans = plan_on_rank0(model, targets, batches[:importance_steps], parent_record, config)
        require_capacity(plans, config, len(parent_record.tasks) if parent_record else 0)  # same plans on every rank
    elif plans is None:
        plans = {name: MatrixPlan(m=min(module.weight.shape), k=0, protected_ratio=0.0, importance=None,
                                  spent=False) for name, module in targets.items()}
    extra_names = set(mark_trainable(model, targets, plans, config))
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard_model(model, mesh, bf16_params=bf16 and device.type == "cuda")
    extras = [p for name, p in model.named_parameters() if name in extra_names]
    projectors = build_projectors(targets, plans, device, shard_right_bases, config, bases)
    constraint = ShardedSubspaceConstraint(targets, plans, projectors, extras)

    rank, world = dist.get_rank(), dist.get_world_size()
    local_batches = [split_batch(batch, rank, world, device) for batch in batches]
    result = train(model, local_batches, constraint, learning_rate=learning_rate,
                   steps_per_epoch=steps_per_epoch, bf16_autocast=bf16, schedule=schedule, on_progress=on_progress)
    result.losses = global_losses(result.losses, device)
    result.final_loss = result.losses[-1] if result.losses else float("nan")
    return result, constraint


def global_losses(local: list[float], device: torch.device) -> list[float]:
    """Each step's mean token loss over the global batch: the ranks' normalised losses averaged."""
    if not local:
        return []
    total = torch.tensor(local, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return (total / dist.get_world_size()).tolist()


def gather_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0, in CPU memory; empty on the other ranks. All ranks call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(state_dict: dict[str, torch.Tensor], parent_dir: Path, out_dir: Path) -> None:
    """Write the trained weights as a Hugging Face model directory (rank 0 only)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32)
    model.load_state_dict(state_dict)
    model.save_pretrained(out_dir)
    for path in Path(parent_dir).iterdir():  # tokenizer and generation files
        if path.is_file() and not (out_dir / path.name).exists():
            shutil.copy2(path, out_dir / path.name)


def read_round(path: Path) -> dict:
    """A job's round (worker/training/sharded_round.py: write_round) as train_sharded's arguments."""
    saved = torch.load(path, weights_only=True)
    bases = {name: Bases(b["U"], b["S"], b["Vh"], b.get("memory")) for name, b in saved["bases"].items()}
    plans = None if saved["plans"] is None else {name: MatrixPlan(**p) for name, p in saved["plans"].items()}
    return {"batches": saved["batches"], "plans": plans,
            "bases": bases, "config": OSFTConfig(**saved["config"]), "method": saved["method"],
            "learning_rate": saved["learning_rate"], "steps_per_epoch": saved["steps_per_epoch"],
            "schedule": LRSchedule(**saved["schedule"]), "bf16": saved["bf16"]}


def progress_writer(path: Path | None):
    """Rank 0's progress reports as JSON lines, which the job's process reads (None elsewhere)."""
    if path is None or dist.get_rank() != 0:
        return None

    def write(progress) -> None:
        with path.open("a") as f:
            f.write(json.dumps(dataclasses.asdict(progress)) + "\n")
    return write


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="the parent (Hugging Face directory)")
    parser.add_argument("--batches", type=Path, help="torch.save'd list of global batches")
    parser.add_argument("--round", type=Path, help="a job's round (batches, plans, bases, config, schedule)")
    parser.add_argument("--progress", type=Path, help="rank 0 appends its progress reports here (JSON lines)")
    parser.add_argument("--out-dir", type=Path, required=True, help="where rank 0 writes the candidate")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--steps-per-epoch", type=int, default=0, help="default: all batches are one epoch")
    parser.add_argument("--method", choices=["osft", "full"], default="osft")
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (master weights stay fp32)")
    parser.add_argument("--shard-right-bases", action="store_true",
                        help="keep 1/N of each right-side basis per rank, gathered per matrix (large models)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each decoder layer in backward (needed for long sequences, large models)")
    args = parser.parse_args(argv)
    if (args.round is not None) == (args.batches is not None and args.learning_rate is not None):
        parser.error("give either --round, or --batches and --learning-rate")

    from transformers import AutoModelForCausalLM

    mesh = init_distributed()
    if args.round is not None:
        job = read_round(args.round)
    else:
        batches = torch.load(args.batches)
        job = {"batches": batches, "learning_rate": args.learning_rate, "method": args.method, "bf16": args.bf16,
               "steps_per_epoch": args.steps_per_epoch or len(batches)}
    batches = job.pop("batches")
    learning_rate, steps_per_epoch = job.pop("learning_rate"), job.pop("steps_per_epoch")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    result, constraint = train_sharded(model, batches, mesh, learning_rate, steps_per_epoch,
                                       shard_right_bases=args.shard_right_bases,
                                       activation_checkpointing=args.activation_checkpointing,
                                       on_progress=progress_writer(args.progress), **job)
    state_dict = gather_state_dict(model)
    if dist.get_rank() == 0:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(state_dict, args.model_dir, args.out_dir)
        summary = {"steps": result.steps, "final_loss": result.final_loss, "losses": result.losses,
                   "mean_step_s": result.mean_step_s, "world_size": dist.get_world_size(),
                   "constraint": constraint.report()}
        (args.out_dir / "training.json").write_text(json.dumps(summary, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
