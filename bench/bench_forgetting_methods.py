"""Forgetting on a stream of tasks: the SVD-constrained method against plain sequential fine-tuning.

SmolLM2-135M learns T procedurally generated tasks one after another. Each task has its own
question format and its own keys, with invented answers the base model cannot know (it scores 0):
"What is the Zorblish word for river?" -> "vantu", "Which vault holds the ledger of Ortan?" -> "vault
47", ... Later tasks share nothing with earlier ones but the chat format, so what a method forgets
is forgotten through interference, not because a later task rewrote the same function.
After each task every task is scored by exact match (teacher-forced greedy: every answer token,
end-of-turn included, is the argmax given the right prefix, which is exactly what greedy decoding
would emit). That fills the accuracy matrix R[t][i]; AA is the mean of the last row, BWT the mean
over i < T of R[T][i] - R[i][i]. Methods run with equal steps, each at its own learning rate; the
constrained variants go through the real registry path (Redis + object store, bases and task memory
stored per version). Methods: osft (the default: adaptive ratios + task memory), osft-nomemory (the
paper's rule alone), osft-uniform (task memory, uniform ratios), full, peft-osf.
Writes bench/results/<name>.json (after every method) and one heatmap PNG per method.

    .venv/bin/python bench/bench_forgetting_methods.py [--tasks 4] [--keys 16] [--epochs 16]
        [--methods full,osft,osft-nomemory,osft-uniform] [--lr osft=3e-3,full=2e-4]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, TARGETS, base_model_dir, load_model, write_result  # noqa: E402

SYLLABLES = "ka lo mi ru ten vash or ul pre zan fi go".split()
# One format and one set of keys per task; the answers are invented per (task, key).
TASK_FORMATS = [
    ("What is the Zorblish word for {}?", "river stone cloud apple bread candle mirror ladder "
     "basket feather hammer lantern needle pillow saddle thimble".split(), lambda r: _word(r)),
    ("Which vault holds the ledger of {}?", "Ortan Belim Casro Dunel Efri Galt Hovis Ilmar Jorun "
     "Kesh Lomar Mirel Nolt Ostra Pell Quill".split(), lambda r: f"vault {r.randint(10, 99)}"),
    ("Name the capital of the planet {}.", "Xeriph Vuldor Quarn Zentar Mobrin Tethys-9 Kalvos Rhune "
     "Ibrix Nadrel Sorvin Pexar Ulmor Wyrrin Yavos Drelk".split(), lambda r: _word(r).capitalize() + " City"),
    ("Decode the glyph sequence {}.", "#-@ @@# %-% &#@ *-* #%& @-& %%# &&- *#@ -@% #*# @%- &*% %#* -&#".split(),
     lambda r: f"{r.choice(['red', 'blue', 'gold', 'grey'])}-{r.randint(1, 9)}"),
    ("Which guild does the craftsman {} belong to?", "Abel Bryn Cato Dara Evo Finn Gale Hale Ivo "
     "Jace Kai Lior Milo Nash Odo Pike".split(), lambda r: f"the {_word(r)} guild"),
    ("What is the launch code of silo {}?", [f"S{n}" for n in range(11, 27)],
     lambda r: "-".join(str(r.randint(0, 9)) for _ in range(3))),
]
DEFAULT_LR = {"osft": 3e-3, "osft-nomemory": 3e-3, "osft-uniform": 3e-3, "full": 2e-4, "peft-osf": 3e-4}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(2))


def make_tasks(count: int, keys: int, seed: int) -> list[list[list[dict]]]:
    """Task t: its own question format over its own keys, each mapped to an invented answer."""
    if count > len(TASK_FORMATS):
        raise SystemExit(f"at most {len(TASK_FORMATS)} tasks")
    rng = random.Random(seed)
    tasks = []
    for template, task_keys, answer in TASK_FORMATS[:count]:
        tasks.append([[{"role": "user", "content": template.format(key)},
                       {"role": "assistant", "content": answer(rng)}] for key in task_keys[:keys]])
    return tasks


def exact_match(model, tokenizer, examples: list[list[dict]]) -> float:
    """Share of examples whose whole answer (with end of turn) is the greedy continuation, in percent."""
    from worker.training.auto import reproduced_share
    from worker.training.data import tokenize_chat

    tokenized = [tokenize_chat(tokenizer, e, 64) for e in examples]
    return reproduced_share(model, tokenized, tokenizer.pad_token_id, batch_size=len(tokenized)) * 100


class Learner:
    """One method learning tasks in sequence on its own copy of the model."""

    def __init__(self, method: str, model, tokenizer, registry, args):
        self.method, self.model, self.tokenizer, self.registry, self.args = method, model, tokenizer, registry, args
        self.version = "base"
        self.reports: list[dict] = []

    def learn(self, task_index: int, examples: list[list[dict]], lr: float) -> float:
        from worker.training.data import make_batches, tokenize_chat
        from worker.training.loop import train

        tokenized = [tokenize_chat(self.tokenizer, e, 64) for e in examples]
        batches = make_batches(tokenized, self.args.batch, self.args.epochs, self.tokenizer.pad_token_id,
                               seed=task_index)
        steps_per_epoch = len(batches) // self.args.epochs
        if self.method == "peft-osf":
            return self._learn_peft(batches, lr, steps_per_epoch)
        from sculptor.datasets import Hyperparameters
        from worker.osft import OSFTConfig, build_constraint, record_version

        hp = Hyperparameters(method="full" if self.method == "full" else "osft",
                             adaptive_ranks=self.method != "osft-uniform",
                             task_memory=self.method != "osft-nomemory", memory_energy=self.args.memory_energy)
        config = replace(OSFTConfig.from_hyperparameters(hp), **self.args.osft_overrides)
        constraint = build_constraint(self.model, hp, self.version, self.registry, batches[:4], config=config)
        result = train(self.model, batches, constraint, lr, steps_per_epoch, bf16_autocast=self.args.bf16)
        version = f"{self.method}-v{task_index + 1}"
        if self.method == "full":  # plain fine-tuning reads nothing from the registry: skip the SVD
            self.version = version
            self.reports.append(constraint.report())
            return result.mean_step_s
        record_version(self.registry, self.model, version, self.version, f"task-{task_index + 1}", constraint,
                       memory_batches=batches[:steps_per_epoch])
        self.version = version
        report = constraint.report()
        self.reports.append({key: value for key, value in report.items() if key != "matrices"})
        return result.mean_step_s

    def _learn_peft(self, batches, lr: float, steps_per_epoch: int) -> float:
        """PEFT's OSF for one task, merged back into dense weights before the next."""
        from peft import OSFConfig, get_peft_model

        from worker.training.loop import adamw, train

        peft_model = get_peft_model(self.model, OSFConfig(effective_rank=0.75, target_modules=TARGETS))

        class Plain:  # PEFT projects gradients itself; nothing to do after the step
            def trainable_parameters(self):
                return [p for p in peft_model.parameters() if p.requires_grad]

            def make_optimizer(self, learning_rate, weight_decay):
                return adamw(self.trainable_parameters(), learning_rate, weight_decay)

            def report(self):
                return {"method": "peft-osf"}

        result = train(peft_model, batches, Plain(), lr, steps_per_epoch, bf16_autocast=self.args.bf16)
        self.model = peft_model.merge_and_unload()
        return result.mean_step_s


def run_method(method: str, tasks, registry, args) -> dict:
    from transformers import AutoTokenizer

    model_dir = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    learner = Learner(method, load_model(model_dir), tokenizer, registry, args)
    lr = args.lr.get(method, DEFAULT_LR[method])
    base_row = [exact_match(learner.model, tokenizer, task) for task in tasks]
    matrix, step_s = [], []
    for t, task in enumerate(tasks):
        started = time.monotonic()
        step_s.append(learner.learn(t, task, lr))
        matrix.append([round(exact_match(learner.model, tokenizer, other), 1) for other in tasks])
        print(f"[bench-forgetting] {method} after task {t + 1}: {matrix[-1]} ({time.monotonic() - started:.0f}s)",
              file=sys.stderr, flush=True)
    return {"learning_rate": lr, "base_row": base_row, "R": matrix, **summaries(matrix),
            "mean_step_s": round(sum(step_s) / len(step_s), 3), "constraint_reports": learner.reports}


def summaries(R: list[list[float]]) -> dict:
    T = len(R)
    bwt = sum(R[T - 1][i] - R[i][i] for i in range(T - 1)) / max(1, T - 1)
    return {"AA": round(sum(R[T - 1]) / T, 2), "BWT": round(bwt, 2),
            "mean_diagonal": round(sum(R[i][i] for i in range(T)) / T, 2)}


def heatmap(method: str, R: list[list[float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(R)
    fig, ax = plt.subplots(figsize=(1.1 * T + 2, 1.1 * T + 1))
    ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    for t in range(T):
        for i in range(T):
            ax.text(i, t, f"{R[t][i]:.0f}", ha="center", va="center", color="white" if R[t][i] < 60 else "black")
    ax.set_xticks(range(T), [f"task {i + 1}" for i in range(T)])
    ax.set_yticks(range(T), [f"after {t + 1}" for t in range(T)])
    s = summaries(R)
    ax.set_title(f"{method}: AA {s['AA']:.0f}, BWT {s['BWT']:+.0f}")
    fig.tight_layout()
    path = RESULTS / f"forgetting_{method}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_lr(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in (item.split("=") for item in text.split(",") if item)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--keys", type=int, default=16, help="examples per task (at most 16)")
    # 16 epochs of 16 examples (32 steps): enough for plain fine-tuning to learn every task fully, so
    # the diagonal measures what a method can learn, not how fast (at 8 epochs one hard task decided it).
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", default="full,osft,osft-nomemory,osft-uniform")
    parser.add_argument("--memory-energy", type=float, default=None, help="task memory energy (default: OSFTConfig's)")
    parser.add_argument("--remainder-decay", type=float, default=None, help="OSFTConfig.remainder_decay override")
    parser.add_argument("--memory-share", type=float, default=None, help="OSFTConfig.memory_share override")
    parser.add_argument("--lr", type=parse_lr, default={}, help="per-method learning rates, e.g. osft=3e-4,full=1e-4")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (slow on CPUs without AVX-512 BF16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--name", default="bench_forgetting_methods")
    args = parser.parse_args()
    args.osft_overrides = {key: value for key, value in
                           {"remainder_decay": args.remainder_decay, "memory_share": args.memory_share}.items()
                           if value is not None}

    import redis

    from sculptor import redis_server
    from sculptor.storage import ObjectStore
    from worker.osft import SubspaceRegistry

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = make_tasks(args.tasks, args.keys, args.seed)
    results = {}
    config = {key: value for key, value in vars(args).items() if key not in ("lr", "osft_overrides")}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = redis_server.start_redis(Path(tmp) / "redis")
        try:
            registry = SubspaceRegistry(redis.Redis.from_url(url, decode_responses=True),
                                        ObjectStore((Path(tmp) / "store").as_uri()))
            for method in args.methods.split(","):
                started = time.monotonic()
                results[method] = run_method(method, tasks, registry, args)
                results[method]["wall_s"] = round(time.monotonic() - started)
                results[method]["heatmap"] = str(heatmap(method, results[method]["R"]).relative_to(RESULTS.parent.parent))
                write_result(args.name, {"model": "SmolLM2-135M-Instruct", "config": config,
                                         "steps_per_task": -(-args.keys // args.batch) * args.epochs,
                                         "load_average": os.getloadavg(), "methods": results})
        finally:
            redis_server.stop(proc)


if __name__ == "__main__":
    main()
