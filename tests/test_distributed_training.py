"""Two CPU processes (gloo) train a tiny Llama under FSDP2 with the constraint on sharded weights.

The gathered weights keep the SVD invariant, frozen parameters stay bit-identical, and the result
equals one process training on the same global batches (the existing single-process path).
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import Shard, distribute_tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from sculptor.datasets import Hyperparameters
from worker.osft import build_constraint
from worker.osft.sharded import ShardedProjector
from worker.osft.subspace import compute_bases
from worker.training.data import make_batches, tokenize_chat
from worker.training.distributed import (
    gather_state_dict,
    init_distributed,
    train_sharded,
)
from worker.training.loop import train

WORDS = ["model", "learns", "new", "tasks", "without", "forgetting", "old", "ones", "answer", "question", "reverse"]
LEARNING_RATE = 1e-2
IMPORTANCE_STEPS = 2
# Same global batches, other reduction order (per-rank partial sums, all-reduces): fp32 rounding only.
# Measured 3.6e-7 at most, against updates of ~1e-2 per element; without the all-reduce the test fails
# on the left-side invariant (‖U_kᵀΔW‖ ≈ 0.3–0.65 ‖ΔW‖).
WEIGHT_TOLERANCE = 5e-6


def global_batches(model_dir) -> list[dict[str, torch.Tensor]]:
    """11 examples in batches of 5 for 2 epochs: rows split 3/2 and, for the last batch of 1 row, 1/0."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [[{"role": "user", "content": f"copy {w}"},
                 {"role": "assistant", "content": " ".join([w] * (1 + i % 3))}] for i, w in enumerate(WORDS)]
    tokenized = [tokenize_chat(tokenizer, messages, 64) for messages in examples]
    return make_batches(tokenized, 5, 2, tokenizer.pad_token_id)


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def run_rank(rank: int, world: int, init_file: str, model_dir: str, batches: list, out_path: str) -> None:
    """One of the 2 processes: train twice (right-side bases resident, then sharded); rank 0 saves both."""
    torch.set_num_threads(1)
    mesh = init_distributed(f"file://{init_file}", rank, world)
    try:
        runs = {}
        for shard_right in (False, True):
            model = load(model_dir)
            result, constraint = train_sharded(model, batches, mesh, LEARNING_RATE,
                                               steps_per_epoch=len(batches) // 2, importance_steps=IMPORTANCE_STEPS,
                                               shard_right_bases=shard_right)
            runs[shard_right] = {"state_dict": gather_state_dict(model), "losses": result.losses,
                                 "report": constraint.report()}
        errors = projection_errors(mesh)
        if rank == 0:
            torch.save({"runs": runs, "projection_errors": errors}, out_path)
    finally:
        dist.destroy_process_group()


# Odd shapes: uneven row shards (and, for 1 × 4, a rank without rows), and every branch of the projector:
# complement on the right, on the left, on both sides, on neither (k < m − k).
ODD_SHAPES = [((7, 5), 3), ((5, 7), 3), ((6, 6), 4), ((8, 3), 1), ((1, 4), 1)]


def projection_errors(mesh) -> dict[tuple[int, int], float]:
    """Max deviation of the sharded projection from (I − U_k U_kᵀ) ΔW (I − V_k V_kᵀ) on full matrices."""
    errors = {}
    for shape, k in ODD_SHAPES:
        generator = torch.Generator().manual_seed(shape[0] * 10 + shape[1])
        parent = torch.randn(shape, generator=generator)
        moved = parent + 0.1 * torch.randn(shape, generator=generator)
        bases = compute_bases(parent)
        reference = distribute_tensor(parent, mesh, [Shard(0)])
        weight = distribute_tensor(moved, mesh, [Shard(0)])
        projector = ShardedProjector(weight, bases, k, shard_right=shape[0] % 2 == 1)
        projector.project_(weight, reference)
        U, Vh = bases.U[:, :k], bases.Vh[:k]
        delta = moved - parent
        expected = parent + (delta - U @ (U.T @ delta)) @ (torch.eye(shape[1]) - Vh.T @ Vh)
        errors[shape] = float((weight.full_tensor() - expected).abs().max())
    return errors


def test_two_processes_keep_the_invariant_and_match_one_process(tiny_model_dir, tmp_path):
    batches = global_batches(tiny_model_dir)
    assert len(batches) == 6 and batches[2]["input_ids"].shape[0] == 1

    out_path = tmp_path / "rank0.pt"
    mp.spawn(run_rank, args=(2, str(tmp_path / "init"), str(tiny_model_dir), batches, str(out_path)), nprocs=2)
    saved = torch.load(out_path)
    runs = saved["runs"]
    assert all(error < 1e-5 for error in saved["projection_errors"].values()), saved["projection_errors"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load(tiny_model_dir)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        constraint = build_constraint(model, Hyperparameters(method="osft"), "base", None, batches[:IMPORTANCE_STEPS])
        reference = train(model, batches, constraint, learning_rate=LEARNING_RATE,
                          steps_per_epoch=len(batches) // 2, bf16_autocast=False)
    finally:
        torch.set_num_threads(threads)
    expected = {name: p.detach() for name, p in model.named_parameters()}

    for shard_right, run in runs.items():
        assert run["report"]["right_bases_sharded"] is shard_right
        plans = {name: plan["k"] for name, plan in run["report"]["matrices"].items()}
        assert plans == {name: plan["k"] for name, plan in constraint.report()["matrices"].items()}
        assert max(abs(a - b) for a, b in zip(run["losses"], reference.losses, strict=True)) < 1e-5
        check_weights(run["state_dict"], before, expected, {f"{name}.weight": k for name, k in plans.items()})


def check_weights(trained: dict, before: dict, expected: dict, targets: dict[str, int]) -> None:
    """The invariant of tests/test_osft_invariant.py on the gathered weights, and equality with one process."""
    for name, parent_weight in before.items():
        weight = trained[name]
        if name not in targets:
            assert torch.equal(weight, parent_weight), f"{name} is frozen but changed"
            continue
        k = targets[name]
        parent = compute_bases(parent_weight)
        delta = weight - parent_weight
        size = delta.norm()
        assert size > 1e-3 * parent_weight.norm(), f"{name} did not train"
        assert (parent.U[:, :k].T @ delta).norm() <= 1e-4 * size, f"{name} moved in a protected left direction"
        assert (delta @ parent.Vh[:k].T).norm() <= 1e-4 * size, f"{name} moved in a protected right direction"
        difference = (weight - expected[name]).abs().max()
        assert difference <= WEIGHT_TOLERANCE, f"{name}: 2 processes differ from 1 by {difference:.2e}"
