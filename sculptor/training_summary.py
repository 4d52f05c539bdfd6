"""What a job's training did (JobRecord.training): written by the worker (worker/pipeline.py), read by the gateway.

Pure models (pydantic): `TrainingSummary`, with the automatic choice of rate and epochs (`AutoChoice`), the
method's constraint report (`ConstraintReport`: how much was protected, per matrix `MatrixPlanRecord`) and the
subspace registry's record of the new version (`SubspaceRecord`, its resolved method config included).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from sculptor.subspace_records import SubspaceRecord


class AutoChoice(BaseModel):
    """The learning rate and epochs a job chose itself (worker/training/auto.py)."""

    learning_rate: float
    epochs: int
    steps: int
    validation_examples: int
    probe_validation_loss: dict[str, float]  # "start", then candidate rate -> answer loss after PROBE_STEPS steps
    reason: str


class MatrixPlanRecord(BaseModel):
    """One target matrix's plan in a job (worker/osft/constraint.py: MatrixPlan)."""

    m: int
    k: int
    protected_ratio: float  # k / m actually protected
    importance: float | None = None
    spent: bool
    memory_rank: int = 0  # input directions of earlier tasks protected beyond V_k


class ConstraintReport(BaseModel):
    """The method's report (`constraint.report()`): "osft" fills every field, "full" the common ones."""

    model_config = ConfigDict(extra="allow")  # timings are named by what ran (svd_s, load_s, importance_s)

    method: str  # "osft" | "full"
    registry_hit: bool = False  # the parent's bases came from the registry (no SVD)
    tasks_absorbed: int = 0
    trainable_matrices: int = 0
    spent_matrices: list[str] = Field(default_factory=list)
    svd_s: float | None = None
    load_s: float | None = None
    importance_s: float | None = None
    adaptive_ranks: bool | None = None
    task_memory: bool | None = None
    general_chat_memory: bool | None = None
    memory_lost: list[str] | None = None  # matrices whose parent memory could not be loaded
    protected_fraction: float | None = None
    memory_fraction: float | None = None
    matrices: dict[str, MatrixPlanRecord] | None = None
    trainable_parameters: int | None = None  # "full" only


class TrainingSummary(BaseModel):
    """JobRecord.training."""

    model_config = ConfigDict(extra="allow")  # a newer worker may add a number before the model names it

    steps: int
    final_loss: float | None = None
    examples: int  # the task's own
    replayed_examples: int = 0  # the parent's answers to everyday prompts, mixed in
    replay_kl: bool = False  # learned as the parent's distribution (a KL term), not only the sampled tokens
    rehearsed_examples: dict[str, int] = Field(default_factory=dict)  # earlier tasks' own examples, per task id
    learning_rate: float
    epochs: int
    auto: AutoChoice | None = None  # set when the rate was chosen automatically
    truncated_examples: int = 0
    max_seq_len: int
    mean_step_s: float = 0.0
    train_processes: int = 1  # ranks each training round ran on (SCULPTOR_TRAIN_GPUS; 1: the job's own process)
    rounds: int = 1  # passes of the planned steps: more while an exact-match task was not yet learned (auto.py)
    reproduced_share: list[float] = Field(default_factory=list)  # of the task's own examples, after each round
    method: str
    constraint: ConstraintReport
    subspace: SubspaceRecord | None = None  # the registry's record of the candidate
