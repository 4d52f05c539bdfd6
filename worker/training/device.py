"""The one device a job runs on (`SCULPTOR_TRAIN_DEVICE`), and what follows from it.

Everything of a job lives there: the model, its batches, the subspace bases and projectors, the task
memory, the importance scores and the gate's models. Master weights stay fp32 on every device; bf16
is autocast only, and only where the device itself has fast bf16.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

DEVICE_SETTING = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_train_device(name: str = "auto") -> torch.device:
    """`auto`: the current CUDA device when there is one, else the CPU. CUDA devices carry their index."""
    if not DEVICE_SETTING.fullmatch(name):
        raise ValueError(f"train device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"SCULPTOR_TRAIN_DEVICE={name} but this machine has no CUDA device")
    device = torch.device(name if name != "auto" else "cuda")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def load_model(model_dir: Path, device: torch.device | str = "cpu"):
    """The model (fp32 master weights) on `device`, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def use_bf16(configured: bool | None, device: torch.device) -> bool:
    """bf16 autocast: as configured, else where `device` has fast bf16 (a CUDA device that supports it;
    a CPU with AVX-512 BF16 or AMX: on AVX2 alone a bf16 linear is several times slower than fp32)."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` when enabled (torch refuses an autocast context for some device types
    even when disabled, hence the null context)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (other values as they are). To CUDA they go from pinned memory
    without blocking, so the copy does not synchronise the host with the device."""
    def move(value):
        if not isinstance(value, torch.Tensor):
            return value
        if device.type == "cuda":
            return value.pin_memory().to(device, non_blocking=True)
        return value.to(device)
    return {key: move(value) for key, value in batch.items()}
