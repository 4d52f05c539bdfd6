"""One device per job (SCULPTOR_TRAIN_DEVICE): the setting, bf16 by device, and a job step that finds any
tensor left on the CPU, without a GPU (tests/fake_device_step.py says how)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from sculptor.config import Settings
from worker.training import device as train_device


def test_the_setting_names_one_device():
    assert Settings(train_device="cuda:1").train_device == "cuda:1"
    for wrong in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(ValidationError):
            Settings(train_device=wrong)
    assert train_device.resolve_train_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert train_device.resolve_train_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            train_device.resolve_train_device("cuda:0")


def test_bf16_follows_the_device_not_the_machine(monkeypatch):
    cpu_answer = train_device.use_bf16(None, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert train_device.use_bf16(None, torch.device("cuda", 0)) is True
    assert train_device.use_bf16(None, torch.device("cpu")) == cpu_answer  # a model left on the CPU: its own answer
    assert train_device.use_bf16(False, torch.device("cuda", 0)) is False


def test_a_job_runs_on_the_job_device_only(tiny_model_dir, redis_url, redis_client, tmp_path):
    """Importance, registry bases, task memory, projectors, the training step, the new version's bases and
    the gate's scoring, all on a fake accelerator: one tensor left on the CPU fails the run."""
    script = Path(__file__).with_name("fake_device_step.py")
    run = subprocess.run([sys.executable, str(script), str(tiny_model_dir), redis_url, str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["registry_hit"] and seen["steps"] == 1 and seen["stored_memory"] > 0
    for key in ("weights", "projector_bases", "memory", "stored"):
        assert seen[key] == ["accel:0"], (key, seen)
    assert seen["gate_model"] == "accel:0"
    assert seen["reads_in_a_step"] == 1  # the loss scalar: nothing else comes back from the device in a step
