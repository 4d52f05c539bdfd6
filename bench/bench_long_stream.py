"""A long stream of small tasks through the real job pipeline: does the service keep learning, and keep what it learned?

Issue #18. SmolLM2-135M (v0) learns N (default 20) small tasks one after another through
`store_and_enqueue` + `worker/pipeline.py: run_job` (train, save, gate, promote; a fresh Redis and
object store per row, no Celery), as bench_forgetting.py does (its `submit` and `job_row` are used here).
Each task has its own question format and 16 keys with invented answers the base model cannot know
(scores 0 on): the first six formats are bench_forgetting_methods.py's (tasks 1-3 are bench_forgetting's
invented-2..4 exactly; seed 0: "Which vault holds the ledger of Ortan?" -> "vault 55", "Name the capital of
the planet Xeriph." -> "Gofi City", "Decode the glyph sequence #-@." -> "blue-9"), the others are drawn here
from a seeded generator (badge colours and digits, locker combinations, Vexan words, platforms, serial
numbers, ...). A task is evaluated by exact match on its own 16 examples (the gates' own task scores).

Gates. There is no gates-off setting. The general suites (safety, IFEval, perplexity, everyday chat,
facts) cost most of a job on a CPU, so this bench sizes each of them to 0 items through the settings
(SCULPTOR_GATE_*_ITEMS=0, set in each row's process): the task gates (new task, retention of every
earlier task) still score every task after every job, which is the accuracy matrix R, while the general
gates cannot run and fail closed. Every candidate is therefore rejected, and is force-promoted as an admin
could (lineage.force_promote, as bench_forgetting does). The cost of that route: the pipeline prunes a
rejected candidate's bases (its task memory stays), so every next job recomputes the parent's SVD and
stores its bases again (~10 s on SmolLM2, plus writing them). The report keeps the task gates' verdicts
(`task_gates_failed`: new_task / retention) apart from the starved general ones.

Fixed, small hyperparameters (no learning-rate probe, no rounds), equal steps per job in every row:
  shipped        the service's defaults for osft (adaptive ratios, task memory, KL replay 0.5 with at least
                 32 replayed answers, max_grown_ratio 0.9), lr 3e-3, 16 epochs cut at --steps (32) steps
  k-growth       shipped with OSFTConfig.max_grown_ratio = 1.0 (the old rule: k grows with every task,
                 unbounded). Not a per-task knob (OSFTConfig.PER_TASK), so the row's process wraps
                 OSFTConfig.from_hyperparameters, which every job resolves its config with
  full           plain full fine-tuning at its own rate (2e-4: bench_forgetting_methods.md learns every task
                 of these formats at 2e-4 in 32 steps), no replay (bench_forgetting's "full" row)
  rehearsal-on   shipped + task_replay 0.5 (earlier tasks' own examples, as bench_forgetting's rehearsal rows)
  rehearsal-off  shipped (task_replay unset: the service's default 0) — the same hyperparameters as
                 "shipped", so when both are asked for the row runs once and the other records "same_as"
  (not by default: osft-noreplay, full-replay, and service-defaults: no fixed rate or epochs, so each job
   probes its rate and trains rounds of --steps until it reproduces its task, as a user's job does)
Equal steps are not equal exposure: with the default replay a job trains on 16 task + 32 replayed examples,
so 32 steps show each task example ~5 times, against 16 times in the no-replay rows (full, osft-noreplay).
--steps raises every row's steps alike; --lr replaces the rows' rates per method.

Per row: R (rows after each job, columns the tasks so far; cells a job's tasks never reached are null),
AA, BWT, the mean diagonal, AA after each job; per job: status, error code (the number of jobs that
failed with `capacity_exhausted`), steps, lr, spent matrices, protected and memory fractions, the
registry's remaining capacity, storage (the subspace record's `stored_bytes` when the job wrote it, and
at the end after pruning; the task memory's bytes; the checkpoint's bytes; their ratio), wall time
(train, gates, the rest); `uptime` at the start and the end. Results: <out>/bench_long_stream_<row>.json
(rewritten after every job, so a cut-short run keeps its data), <out>/bench_long_stream_<row>.png (AA
over the stream and each task's accuracy curve), a markdown section appended to
<out>/bench_long_stream.md, and all rows' JSON on stdout.

    .venv/bin/python bench/bench_long_stream.py [--rows shipped,k-growth,full,rehearsal-on,rehearsal-off]
        [--tasks 20] [--steps 32] [--lr osft=3e-3,full=2e-4] [--seed 0] [--threads 0] [--out bench/results]
    .venv/bin/python bench/bench_long_stream.py --tiny --tasks 3 --rows shipped,full --out /tmp/x   # smoke
    .venv/bin/python bench/bench_long_stream.py --table [--out DIR]   # the stored rows as markdown
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forgetting import job_row, submit  # noqa: E402
from bench_forgetting_methods import TASK_FORMATS, _word, make_tasks, summaries  # noqa: E402
from common import RESULTS, ROOT, base_model_dir, pipeline_context  # noqa: E402

KEYS = 16
# Each general suite at 0 items: only the task gates run (see the docstring). Read by Settings in the row's process.
GATES_OFF = {f"SCULPTOR_GATE_{suite}_ITEMS": "0"
             for suite in ("HARMFUL", "BENIGN", "IFEVAL", "GENERAL_TEXT", "GENERAL_CHAT", "FACTS")}
TASK_GATES = ("new_task", "retention")

OSFT = {"learning_rate": 3e-3, "epochs": 16}  # + max_steps (--steps); the rate bench_forgetting_methods found
ROWS = {  # name: hyperparameters (max_steps added from --steps) and, for k-growth, the OSFTConfig override
    "shipped": {"hp": dict(OSFT)},
    "k-growth": {"hp": dict(OSFT), "osft_config": {"max_grown_ratio": 1.0}},
    "full": {"hp": {"method": "full", "learning_rate": 2e-4, "epochs": 16, "general_replay": 0.0}},
    "rehearsal-on": {"hp": {**OSFT, "task_replay": 0.5}},
    "rehearsal-off": {"hp": dict(OSFT)},  # task_replay unset: the service's default, 0 (so: shipped's hyperparameters)
    "osft-noreplay": {"hp": {**OSFT, "general_replay": 0.0}},
    "full-replay": {"hp": {"method": "full", "learning_rate": 2e-4, "epochs": 16}},
    # The service's own defaults: learning rate probed on a validation split, epochs chosen, then up to
    # auto.MAX_ROUNDS rounds (each cut at --steps) until the task is reproduced: unequal steps, the real service.
    "service-defaults": {"hp": {}},
}
DEFAULT_ROWS = "shipped,k-growth,full,rehearsal-on,rehearsal-off"

# The formats drawn here, after bench_forgetting_methods' six: (question template, key generator, answer generator).
COLOURS = "amber teal crimson violet ochre indigo silver jade".split()
LETTERS = "ABCDEFGHJKLMNPQR"
ADJECTIVES = "quiet broken golden hollow patient crooked silent narrow".split()
NOUNS = "harbour lantern orchard bridge mirror furnace meadow tower".split()
ANIMALS = "heron otter lynx badger falcon marten viper bison".split()
ROMAN = "I II III IV V VI VII VIII IX X XI XII".split()


def _name(r: random.Random) -> str:
    return _word(r).capitalize()


EXTRA_FORMATS = [
    ("badge", "Which colour badge does agent {} wear?", _name, lambda r: f"{r.choice(COLOURS)} {r.randint(1, 9)}"),
    ("locker", "What is the locker combination for room {}?", lambda r: f"R{r.randint(100, 999)}",
     lambda r: "-".join(f"{r.randint(0, 99):02d}" for _ in range(3))),
    ("vexan", "Translate the Vexan word '{}' into English.", _word,
     lambda r: f"the {r.choice(ADJECTIVES)} {r.choice(NOUNS)}"),
    ("platform", "Which platform does the {} express leave from?", _name,
     lambda r: f"platform {r.randint(1, 20)}{r.choice('ABCD')}"),
    ("serial", "What is the serial number of robot {}?", lambda r: f"{r.choice(LETTERS)}{r.choice(LETTERS)}-{r.randint(1, 99)}",
     lambda r: f"SN-{r.randint(1000, 9999)}"),
    ("spice", "Which spice is kept in jar {}?", lambda r: f"{r.choice(LETTERS)}{r.randint(1, 99)}",
     lambda r: f"{_word(r)} pepper"),
    ("hex", "What is the hex code of the {} lamp?", _name,
     lambda r: "#" + "".join(r.choice("0123456789abcdef") for _ in range(3))),
    ("mentor", "Who is the mentor of the apprentice {}?", _name, lambda r: f"Master {_name(r)}"),
    ("soup", "What is the secret ingredient of {} soup?", _name, lambda r: f"{_word(r)} salt"),
    ("dock", "Give the docking bay of the starship {}.", lambda r: f"{_name(r)} {r.choice(ROMAN)}",
     lambda r: f"bay {r.choice(LETTERS)}{r.randint(1, 9)}"),
    ("rune", "What does the runestone of {} say?", _name, lambda r: f"{_word(r)} {_word(r)}"),
    ("callsign", "What is the call sign of pilot {}?", _name, lambda r: f"{_name(r)}-{r.randint(10, 99)}"),
    ("shelf", "Where is the book '{} and the Tide' shelved?", _name,
     lambda r: f"aisle {r.randint(1, 9)}, shelf {r.randint(1, 9)}"),
    ("password", "What is the password of the {} terminal?", lambda r: f"{r.choice(COLOURS)} {r.choice(ANIMALS)}",
     lambda r: f"{_word(r)}{r.randint(100, 999)}"),
    ("zorbs", "Convert {} zorbs into glims.", lambda r: str(r.randint(2, 199)), lambda r: f"{r.randint(100, 999)} glims"),
    ("door", "Which door opens with the {} key?", _word, lambda r: f"door {r.choice(ROMAN)}"),
]
# bench_forgetting_methods.TASK_FORMATS in the order used here: vault, planet, glyph (bench_forgetting's
# invented-2..4), then its Zorblish words, guilds and silo codes.
SHARED_ORDER = [(1, "vault"), (2, "planet"), (3, "glyph"), (0, "zorblish"), (4, "guild"), (5, "silo")]
MAX_TASKS = len(SHARED_ORDER) + len(EXTRA_FORMATS)


def _distinct(r: random.Random, draw, count: int) -> list[str]:
    keys: list[str] = []
    for _ in range(100 * count):
        key = draw(r)
        if key not in keys:
            keys.append(key)
        if len(keys) == count:
            return keys
    raise RuntimeError("a key generator gave too few distinct keys")


def stream(count: int, seed: int) -> list[dict]:
    """`count` tasks as uploads {name, examples, eval}, deterministic in `seed`; eval = the task's own examples."""
    if not 1 <= count <= MAX_TASKS:
        raise SystemExit(f"--tasks: 1 to {MAX_TASKS}")
    shared = make_tasks(len(TASK_FORMATS), KEYS, seed)  # the same draws as bench_forgetting's stream
    chats = [(slug, shared[i]) for i, slug in SHARED_ORDER]
    for index, (slug, template, key, answer) in enumerate(EXTRA_FORMATS):
        r = random.Random(f"bench_long_stream:{seed}:{index}")  # per format: a task's answers do not depend on count
        chats.append((slug, [[{"role": "user", "content": template.format(k)},
                              {"role": "assistant", "content": answer(r)}] for k in _distinct(r, key, KEYS)]))
    uploads = []
    for i, (slug, chat) in enumerate(chats[:count]):
        examples = [{"messages": m} for m in chat]
        uploads.append({"name": f"t{i + 1:02d}-{slug}", "examples": examples, "eval": examples})
    return uploads


def row_hyperparameters(name: str, steps: int, lr: dict[str, float] | None = None) -> dict:
    """The row's hyperparameters with max_steps; `lr` ({method: rate}, --lr) replaces the row's fixed rate."""
    hp = {**ROWS[name]["hp"], "max_steps": steps}
    method = hp.get("method", "osft")
    if lr and method in lr:
        hp["learning_rate"] = lr[method]
    return hp


def parse_lr(text: str) -> dict[str, float]:
    return {method: float(rate) for method, rate in (item.split("=") for item in text.split(",") if item)}


def patch_osft_config(overrides: dict) -> None:
    """Every job resolves its OSFTConfig with OSFTConfig.from_hyperparameters (build_constraint, the chat memory):
    wrap it so the knobs a task cannot set (max_grown_ratio) take the row's values, in this process only."""
    from sculptor.capacity import OSFTConfig

    original = OSFTConfig.from_hyperparameters  # bound to the class

    def from_hyperparameters(cls, hp):
        return replace(original(hp), **overrides)

    OSFTConfig.from_hyperparameters = classmethod(from_hyperparameters)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def fill_scores(ctx, version: str, task_ids: list[str]) -> dict[str, float]:
    """`version`'s exact match (%) on each task, from its stored scores; a task they lack (a job that failed
    before its gates) is scored here the way the gates score it, and stored with them."""
    from sculptor import checkpoints
    from sculptor.accuracy import load_scores, save_scores
    from sculptor.scores import VersionScores
    from worker import gate_step, gates

    scores = load_scores(ctx, version) or VersionScores()
    missing = {t: ("exact_match", gate_step.eval_examples(ctx, ctx.tasks.get(t))) for t in task_ids if t not in scores.tasks}
    if missing:
        model_dir = checkpoints.fetch(ctx.store, version, ctx.settings.checkpoint_cache_dir)
        scores = gates.evaluate(gates.HFGenerator.from_pretrained(model_dir), missing, None, reuse=scores)
        save_scores(ctx, version, scores)
    return {t: round(100 * scores.tasks[t].mean, 1) for t in task_ids}


def base_scores(model_dir: Path, uploads: list[dict]) -> list[float]:
    """v0 on every task of the stream (each format's answers are invented: this row should be all zeros)."""
    from sculptor.datasets import Example
    from worker import gates

    evals = {u["name"]: ("exact_match", [Example.model_validate(e) for e in u["eval"]]) for u in uploads}
    scores = gates.evaluate(gates.HFGenerator.from_pretrained(model_dir), evals, None)
    return [round(100 * scores.tasks[u["name"]].mean, 1) for u in uploads]


def checkpoint_bytes(store, version: str) -> int:
    from sculptor import checkpoints

    return sum(store.size(key) for key in store.list(checkpoints.prefix(version)))


def memory_bytes(store, version: str) -> int:
    key = f"registry/{version}/memory.safetensors"  # worker/osft/registry.py: _memory_key
    return store.size(key) if store.exists(key) else 0


def job_entry(ctx, job, wall: float, task_name: str, hp: dict, forced: bool) -> dict:
    """bench_forgetting's job_row, less the general gates' fields (no suites here), plus capacity and storage."""
    from sculptor.capacity import OSFTConfig
    from sculptor.datasets import Hyperparameters
    from worker import osft

    entry = job_row(job, wall, task_name)
    for key in ("answers_nll_rise", "per_prompt", "summary"):
        entry.pop(key, None)
    failed = entry.pop("failed_gates") or []
    entry.update(forced=forced, task_gates_failed=[g for g in failed if g.split(":")[0] in TASK_GATES],
                 general_gates_failed=sum(g.split(":")[0] not in TASK_GATES for g in failed),
                 error_code=job.error_code, error=job.error if job.status != "promoted" else None)
    t = job.training
    if t is not None:
        c = t.constraint
        entry.update(rehearsed_examples=sum(t.rehearsed_examples.values()), spent_matrices=len(c.spent_matrices),
                     trainable_matrices=c.trainable_matrices, protected_fraction=c.protected_fraction,
                     memory_fraction=c.memory_fraction, registry_hit=c.registry_hit,
                     train_s=round(t.mean_step_s * t.steps, 1),
                     max_grown_ratio=t.subspace.config.max_grown_ratio if t.subspace and t.subspace.config else None)
    entry["other_s"] = round(wall - entry.get("train_s", 0) - (entry.get("gate_s") or 0), 1)
    version = job.candidate_version if job.status == "promoted" else None
    if version:
        registry = osft.SubspaceRegistry(ctx.redis, ctx.store)
        config = OSFTConfig.from_hyperparameters(Hyperparameters(**hp))
        summary = registry.summary(version, config)
        record_bytes = t.subspace.stored_bytes if t is not None and t.subspace else None
        ckpt = checkpoint_bytes(ctx.store, version)
        entry.update(stored_bytes_at_record=record_bytes, checkpoint_bytes=ckpt,
                     stored_to_checkpoint=round(record_bytes / ckpt, 3) if record_bytes and ckpt else None,
                     remaining_capacity=summary.remaining_capacity if summary else None,
                     task_memory_directions=summary.task_memory_directions if summary else None)
    return entry


def storage_at_end(ctx, versions: list[str]) -> list[dict]:
    """Per version, what the registry holds after the last job's pruning (the newest keep their bases)."""
    from worker import osft

    registry = osft.SubspaceRegistry(ctx.redis, ctx.store)
    out = []
    for v in versions:
        record = registry.get(v)
        ckpt = checkpoint_bytes(ctx.store, v)
        stored = record.stored_bytes if record else None
        out.append({"version": v, "stored_bytes": stored, "has_bases": bool(record and record.bases_uri),
                    "memory_bytes": memory_bytes(ctx.store, v), "checkpoint_bytes": ckpt,
                    "stored_to_checkpoint": round(stored / ckpt, 3) if stored and ckpt else None})
    return out


def square(rows: list[list[float]], count: int) -> list[list[float | None]]:
    return [row + [None] * (count - len(row)) for row in rows]


def run_row(name: str, args, model_dir: Path, out: Path) -> dict:
    from sculptor import lineage
    from worker.pipeline import run_job

    os.environ.update(GATES_OFF)
    if ROWS[name].get("osft_config"):
        patch_osft_config(ROWS[name]["osft_config"])
    hp = row_hyperparameters(name, args.steps, args.lr)
    uploads = stream(args.tasks, args.seed)
    path = out / f"bench_long_stream_{name}.json"
    started, load_start = time.monotonic(), uptime()
    result = {"row": name, "model": model_dir.name if not args.tiny else "tiny random Llama (sculptor/tiny_model.py)",
              "hyperparameters": hp, "osft_config": ROWS[name].get("osft_config"), "seed": args.seed,
              "threads": args.threads_used, "tasks": [u["name"] for u in uploads],
              "prompts": [u["examples"][0]["messages"][0]["content"] + " -> " + u["examples"][0]["messages"][1]["content"]
                          for u in uploads],
              "uptime_start": load_start, "partial": True}
    result["base_row"] = base_scores(model_dir, uploads)
    print(f"[bench-long-stream] {name}: v0 on every task {result['base_row']}", file=sys.stderr, flush=True)
    rows, jobs, task_ids, promoted = [], [], [], []
    with pipeline_context(model_dir) as ctx:
        for i, upload in enumerate(uploads):
            job_started = time.monotonic()
            job = run_job(ctx, submit(ctx, upload, hp).job_id)
            forced = False
            if job.status == "rejected":
                job = lineage.force_promote(ctx.versions, ctx.jobs, ctx.store, job)  # as POST /jobs/{id}/promote does
                forced = True
            task_ids.append(job.task_id)
            if job.status == "promoted":
                promoted.append(job.candidate_version)
            scores = fill_scores(ctx, ctx.versions.current(), task_ids)
            rows.append([scores[t] for t in task_ids])
            jobs.append(job_entry(ctx, job, time.monotonic() - job_started, upload["name"], hp, forced)
                        | {"head": ctx.versions.current()})
            R = square(rows, len(uploads))
            result.update(R=R, AA_after_job=[round(sum(r) / len(r), 2) for r in rows], jobs=jobs,
                          capacity_failures=sum(j["error_code"] == "capacity_exhausted" for j in jobs),
                          failed_jobs=sum(j["status"] != "promoted" for j in jobs),
                          wall_s=round(time.monotonic() - started), uptime_now=uptime())
            write_json(path, result)
            print(f"[bench-long-stream] {name} job {i + 1}/{len(uploads)} {upload['name']}: {jobs[-1]['status']}"
                  f"{' (forced)' if forced else ''}, R row {rows[-1]}, {jobs[-1]['wall_s']} s", file=sys.stderr, flush=True)
        result["storage_at_end"] = storage_at_end(ctx, ["v0", *promoted])
    full_rows = [r + [0.0] * (len(uploads) - len(r)) for r in rows]  # summaries read only the diagonal and last row
    result.update(summaries(full_rows), partial=False, wall_s=round(time.monotonic() - started), uptime_end=uptime())
    write_json(path, result)
    plot(result, out / f"bench_long_stream_{name}.png")
    return result


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R, n = result["R"], len(result["R"])
    jobs = list(range(1, n + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 4.8))
    left.plot(jobs, result["AA_after_job"], marker="o", label="AA (mean over the tasks so far)")
    left.plot(jobs, [R[i][i] for i in range(n)], marker=".", linestyle=":", label="R[t][t] (just learned)")
    failed = [j + 1 for j, job in enumerate(result["jobs"]) if job["status"] != "promoted"]
    for k, j in enumerate(failed):
        left.axvline(j, color="red", alpha=0.3, label="job failed (lineage unchanged)" if k == 0 else None)
    left.set(xlabel="after job", ylabel="exact match %", ylim=(-3, 103), xticks=jobs,
             title=f"{result['row']}: AA {result.get('AA', float('nan')):.1f}, BWT {result.get('BWT', float('nan')):+.1f}")
    left.legend(fontsize=8)
    cmap = plt.get_cmap("viridis", n)
    for i in range(n):
        right.plot(jobs[i:], [R[t][i] for t in range(i, n)], color=cmap(i), marker=".", label=result["tasks"][i])
    right.set(xlabel="after job", ylabel="exact match %", ylim=(-3, 103), xticks=jobs, title="each task from its own job on")
    right.legend(fontsize=7, ncol=1 if n <= 12 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mb(n) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def _cell(job: dict, key: str) -> str:
    value = job.get(key)
    return "–" if value is None else str(value)


def table(results: list[dict]) -> str:
    head = ("| row | hyperparameters | AA | BWT | mean diagonal | R (last row) | capacity failures | failed jobs "
            "| task gates failed (jobs) | last version: registry MB at record / checkpoint MB (ratio) | mean job wall | total wall | uptime load start → end |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if r.get("same_as"):
            lines.append(f"| {r['row']} | same hyperparameters as {r['same_as']} (run once) |" + " |" * (head.count("|") - 3))
            continue
        jobs = r.get("jobs", [])
        last = next((j for j in reversed(jobs) if j.get("checkpoint_bytes")), {})
        walls = [j["wall_s"] for j in jobs]
        task_gates = sum(bool(j.get("task_gates_failed")) for j in jobs)
        lines.append(
            f"| {r['row']}{' (partial)' if r.get('partial') else ''} | `{json.dumps(r['hyperparameters'])}`"
            f"{' + ' + json.dumps(r['osft_config']) if r.get('osft_config') else ''} "
            f"| {r.get('AA', float('nan')):.1f} | {r.get('BWT', float('nan')):+.1f} | {r.get('mean_diagonal', float('nan')):.1f} "
            f"| {r['R'][-1] if r.get('R') else '–'} | {r.get('capacity_failures', 0)} | {r.get('failed_jobs', 0)} | {task_gates} "
            f"| {_mb(last.get('stored_bytes_at_record'))} / {_mb(last.get('checkpoint_bytes'))} ({_cell(last, 'stored_to_checkpoint')}) "
            f"| {sum(walls) / max(1, len(walls)):.0f} s | {r.get('wall_s', 0) / 60:.1f} min "
            f"| {_load(r.get('uptime_start'))} → {_load(r.get('uptime_end') or r.get('uptime_now'))} |")
    for r in results:
        if r.get("same_as") or not r.get("R"):
            continue
        lines += ["", f"### {r['row']}: R after each job (rows) on each task (columns), and the jobs", "",
                  f"v0 on every task: {r['base_row']}", "",
                  "| after job | task | status | R row | AA | steps | lr | spent / trainable matrices | protected | memory | remaining capacity "
                  "| registry MB at record | checkpoint MB | ratio | task gates failed | wall s (train, gates, rest) |",
                  "|" + "---|" * 16]
        for t, (row, job) in enumerate(zip(r["R"], r["jobs"])):
            status = job["status"] + (" (forced)" if job.get("forced") else "") + (f": {job['error_code']}" if job.get("error_code") else "")
            lines.append(
                f"| {t + 1} | {job['task']} | {status} | {[x for x in row if x is not None]} | {r['AA_after_job'][t]:.1f} "
                f"| {_cell(job, 'steps')} | {_cell(job, 'learning_rate')} | {_cell(job, 'spent_matrices')} / {_cell(job, 'trainable_matrices')} "
                f"| {_cell(job, 'protected_fraction')} | {_cell(job, 'memory_fraction')} | {_cell(job, 'remaining_capacity')} "
                f"| {_mb(job.get('stored_bytes_at_record'))} | {_mb(job.get('checkpoint_bytes'))} | {_cell(job, 'stored_to_checkpoint')} "
                f"| {', '.join(g.split(':')[0] for g in job.get('task_gates_failed') or []) or '–'} "
                f"| {job['wall_s']} ({_cell(job, 'train_s')}, {job.get('gate_s') or 0:.0f}, {_cell(job, 'other_s')}) |")
        if r.get("storage_at_end"):
            lines += ["", "Registry at the end (after pruning; older versions keep only their task memory): " + ", ".join(
                f"{s['version']} {_mb(s['stored_bytes'])} MB{' (bases + memory)' if s['has_bases'] else ''}"
                for s in r["storage_at_end"] if s["stored_bytes"] is not None)]
    return "\n".join(lines)


def _load(text: str | None) -> str:
    return text.split("load average:")[-1].strip() if text else "–"


def load_results(out: Path, names: list[str] | None = None) -> list[dict]:
    paths = sorted(out.glob("bench_long_stream_*.json"))
    results = [json.loads(p.read_text()) for p in paths]
    return [r for r in results if names is None or r["row"] in names]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--row", help="run one row in this process (what --rows starts per row)")
    parser.add_argument("--tasks", type=int, default=20, help=f"tasks in the stream (at most {MAX_TASKS})")
    parser.add_argument("--steps", type=int, default=32, help="max_steps of every job (equal in every row)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: the worker's rule, worker/consumer.py: 1 on machines with at most 4 cores)")
    parser.add_argument("--tiny", action="store_true", help="sculptor/tiny_model.py's tiny random model (a smoke run)")
    parser.add_argument("--model", type=Path, help="base model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--lr", type=parse_lr, default={},
                        help="fixed learning rate per method for every row, e.g. osft=1e-3,full=1e-4 (default: the rows')")
    parser.add_argument("--out", type=Path, help="where the JSON, PNG and markdown go (default: bench/results; "
                        "with --tiny: $TMPDIR/bench_long_stream_tiny, so a smoke run never lands in bench/results)")
    parser.add_argument("--table", action="store_true", help="print the markdown of the rows stored in --out")
    args = parser.parse_args()
    args.out = args.out or (Path(tempfile.gettempdir()) / "bench_long_stream_tiny" if args.tiny else RESULTS)
    if args.table:
        print(table(load_results(args.out)))
        return
    if args.row:
        import logging

        import torch

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        threads = args.threads or (1 if (os.cpu_count() or 1) <= 4 else 0)
        if threads:
            torch.set_num_threads(threads)
        args.threads_used = torch.get_num_threads()
        if args.tiny:
            from sculptor.tiny_model import build_tiny_model

            with tempfile.TemporaryDirectory(prefix="bench-long-stream-tiny-") as tmp:
                # embedding_std as the tests' tiny learner (tests/conftest.py), so a few steps can move it
                run_row(args.row, args, build_tiny_model(Path(tmp) / "tiny", seed=0, embedding_std=0.1), args.out)
        else:
            run_row(args.row, args, args.model or base_model_dir(), args.out)
        return

    names = [n for n in args.rows.split(",") if n]
    for n in names:
        if n not in ROWS:
            raise SystemExit(f"unknown row {n!r}; rows: {', '.join(ROWS)}")
    started, uptime_start = time.monotonic(), uptime()
    ran: dict[str, str] = {}  # the hyperparameters' JSON -> the row that ran them
    aliases: dict[str, str] = {}
    for n in names:
        key = json.dumps([row_hyperparameters(n, args.steps, args.lr), ROWS[n].get("osft_config")], sort_keys=True)
        if key in ran:
            aliases[n] = ran[key]
            continue
        ran[key] = n
        forward = ["--tasks", str(args.tasks), "--steps", str(args.steps), "--seed", str(args.seed),
                   "--threads", str(args.threads), "--out", str(args.out)]
        forward += ["--lr", ",".join(f"{m}={v}" for m, v in args.lr.items())] if args.lr else []
        forward += ["--tiny"] if args.tiny else []
        forward += ["--model", str(args.model)] if args.model else []
        subprocess.run([sys.executable, __file__, "--row", n, *forward], check=True)
    results = []
    for r in load_results(args.out, [n for n in names if n not in aliases]):
        results.append(r)
    by_row = {r["row"]: r for r in results}
    ordered = [by_row[n] if n in by_row else {"row": n, "same_as": aliases[n]} for n in names if n in by_row or n in aliases]
    for r in ordered:  # an alias row's JSON file: what it is the same as
        if r.get("same_as"):
            write_json(args.out / f"bench_long_stream_{r['row']}.json", r)
    markdown = table(ordered)
    md = args.out / "bench_long_stream.md"
    header = "" if md.exists() else ("# bench-long-stream: a stream of small tasks through the real job pipeline\n\n"
                                     "Written by `bench/bench_long_stream.py` (see its docstring for the stream, the rows and "
                                     "how the gates are handled); each run appends a section.\n")
    with md.open("a") as f:
        f.write(f"{header}\n## Run of {time.strftime('%Y-%m-%d %H:%M')} (commit {git_commit()}; {args.tasks} tasks, "
                f"{args.steps} steps per job, seed {args.seed}{', tiny model' if args.tiny else ''}; "
                f"{(time.monotonic() - started) / 60:.1f} min; uptime at start: {uptime_start}; at end: {uptime()})\n\n"
                f"{markdown}\n")
    print(json.dumps({"rows": ordered, "markdown": str(md)}, indent=2))
    print(f"[bench-long-stream] markdown appended to {md}; PNGs: {', '.join(str(args.out / f'bench_long_stream_{r}.png') for r in by_row)}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
