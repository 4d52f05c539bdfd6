"""A job's training progress: written by the training loop, stored on the job record, shown by the API.

A plain dataclass, not a pydantic model, so the training loop stays importable where only torch is
installed (bench/gpu_check.py); pydantic validates it as a field of JobRecord all the same.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
