"""One round of a job's training on several processes (SCULPTOR_TRAIN_GPUS = N > 1): FSDP2 under torchrun.

The job's own process keeps its model (fp32, on the CPU) and does what it does for a one-device job: the
plan, the learning-rate probe, the candidate's SVD, the memory and the gates. Each training round is handed
to N ranks and back:

    write_round   the current weights (a model directory), the round's batches, the job's plans, the parent's
                  bases from the registry with the task memory the job uses, the config and the schedule;
    torchrun      N ranks of `worker.training.distributed --round` (one per GPU; gloo processes on a CPU
                  machine), sharded with `fully_shard`, the constraint applied on shards;
    watch         rank 0's progress lines become the job's progress; a cancel, the job's time limit or a lost
                  job lock ends the whole process group (torchrun ends every rank when one fails, so no rank
                  is left waiting in a collective); a failed rank fails the job with its log's tail;
    load          rank 0's gathered weights go back into the job's model.

Why a subprocess per round rather than ranks kept alive: the job's process stays the one owner of the job's
record and model, so the rounds-until-learned loop, record_version and the gates are the one-device code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sculptor.progress import Progress
from worker.osft.subspace import Bases
from worker.training.loop import LRSchedule, TrainingCancelled, TrainResult

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.5
STOP_GRACE_S = 15.0  # after SIGTERM, how long torchrun gets to end its ranks before SIGKILL
LOG_TAIL_CHARS = 2000


class ShardedTrainingFailed(RuntimeError):
    """A rank (or torchrun) exited with an error."""

    code = "sharded_training_failed"


@dataclasses.dataclass
class RoundResult:
    result: TrainResult
    world_size: int
    report: dict  # the ranks' constraint report (sharded: True)


def train_round_on_ranks(
    processes: int,
    model: torch.nn.Module,
    batches,
    constraint,
    bases: dict[str, Bases] | None,
    learning_rate: float,
    steps_per_epoch: int,
    bf16: bool,
    schedule: LRSchedule,
    on_progress: Callable[[Progress], None],
    should_stop: Callable[[], bool],
) -> RoundResult:
    """Train `model` (in place) on `batches` with `processes` ranks. `bases`: the parent's, for method "osft"."""
    with tempfile.TemporaryDirectory(prefix="sculptor-round-") as tmp:
        work = Path(tmp)
        write_round(work, model, batches, constraint, bases, learning_rate, steps_per_epoch, bf16, schedule)
        run_ranks(processes, work, on_progress, should_stop)
        return load_round_result(work / "out", model)


def write_round(work: Path, model, batches, constraint, bases, learning_rate: float, steps_per_epoch: int,
                bf16: bool, schedule: LRSchedule) -> None:
    model.save_pretrained(work / "start")
    method = "osft" if bases is not None else "full"
    saved = {
        "batches": [dict(batch) for batch in batches],
        "plans": {name: dataclasses.asdict(plan) for name, plan in constraint.plans.items()} if bases is not None
        else None,
        "bases": {name: {"U": b.U, "S": b.S, "Vh": b.Vh, **({"memory": b.memory} if b.memory is not None else {})}
                  for name, b in (bases or {}).items()},
        "config": dataclasses.asdict(constraint.config), "method": method, "learning_rate": learning_rate,
        "steps_per_epoch": steps_per_epoch, "schedule": dataclasses.asdict(schedule), "bf16": bf16,
    }
    torch.save(saved, work / "round.pt")


def run_ranks(processes: int, work: Path, on_progress: Callable[[Progress], None],
              should_stop: Callable[[], bool]) -> None:
    """torchrun the round and watch it; returns when every rank ended well, else raises."""
    progress, log_path = work / "progress.jsonl", work / "ranks.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "--max-restarts=0", "-m", "worker.training.distributed", "--model-dir", str(work / "start"),
           "--round", str(work / "round.pt"), "--progress", str(progress), "--out-dir", str(work / "out")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    read = 0
    try:
        while proc.poll() is None:
            time.sleep(POLL_S)
            read = _report_progress(progress, read, on_progress)
            if should_stop():  # may raise instead (time limit, lost lock): the finally ends the ranks then
                raise TrainingCancelled("cancelled while training")
    finally:
        if proc.poll() is None:
            stop_process_group(proc)
    _report_progress(progress, read, on_progress)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        raise ShardedTrainingFailed(f"the training round on {processes} processes failed (torchrun exit code "
                                    f"{proc.returncode}); the end of its log:\n{tail}")


def _report_progress(path: Path, read: int, on_progress: Callable[[Progress], None]) -> int:
    """Hand the newest complete progress line after byte `read` to `on_progress`; returns the new offset."""
    if not path.exists():
        return read
    with path.open("rb") as f:
        f.seek(read)
        chunk = f.read()
    complete = chunk[:chunk.rfind(b"\n") + 1]
    lines = complete.decode().splitlines()
    if lines:
        on_progress(Progress(**json.loads(lines[-1])))
    return read + len(complete)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun and its ranks (their own session), then SIGKILL to whatever is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # ranks torchrun did not end, or torchrun itself
    except ProcessLookupError:
        pass
    proc.wait()


def load_round_result(out: Path, model: torch.nn.Module) -> RoundResult:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(out.glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ShardedTrainingFailed(f"the ranks' checkpoint does not fit the model: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}")
    summary = json.loads((out / "training.json").read_text())
    result = TrainResult(steps=summary["steps"], final_loss=summary["final_loss"],
                         mean_step_s=summary["mean_step_s"], losses=summary["losses"])
    return RoundResult(result, summary["world_size"], summary["constraint"])
