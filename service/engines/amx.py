"""AMX tile permission for vLLM's CPU attention kernels, in every vLLM process.

Root cause of the SIGILL (exit code -4) on AMX CPUs with bf16 + `enforce_eager`: vLLM's CPU attention
(`cpu_attention_with_kv_cache`) picks its "amx" kernels whenever the CPU reports AMX tiles and the
dtype is bf16 (`vllm/v1/attention/backends/cpu_attn.py: _get_attn_isa`). On Linux a process may only
execute AMX tile instructions after asking the kernel for the tile state
(`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); without it the first tile load raises SIGILL.
vLLM never asks. Compiled mode only works by accident: torch inductor's ISA probe calls
`torch.cpu._init_amx()` (which makes that request) while compiling, before the first forward. In eager
mode nothing does, so the worker dies on the first generate.

The fix: a vLLM general plugin (`vllm.general_plugins` entry point in pyproject.toml), which vLLM runs
in the API process, the engine core and every worker process before any model code, requests the
permission. `check_engine_settings` refuses, at gateway start, a setting that still could not work
(the kernel refuses AMX, or the plugin is filtered out by VLLM_PLUGINS), with the setting to change.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("sculptor.engine")

PLUGIN_NAME = "sculptor_amx"  # the entry point's name: what VLLM_PLUGINS must list when it is set


class EngineSettingsError(RuntimeError):
    """An engine setting that cannot run on this machine; the message says what to change."""


def amx_tiles_reported() -> bool:
    import torch

    return torch.cpu._is_amx_tile_supported()


def request_amx_permission() -> bool:
    """Ask the kernel for AMX tile state for this process. True when granted (idempotent)."""
    import torch

    return bool(torch.cpu._init_amx())


def vllm_plugin() -> None:
    """Run by vLLM in each of its processes (vllm.plugins.load_general_plugins)."""
    if amx_tiles_reported() and not request_amx_permission():
        log.error("this CPU reports AMX but the kernel refused AMX permission: vLLM's bf16 attention will fail")


def plugin_enabled() -> bool:
    allowed = os.environ.get("VLLM_PLUGINS")
    return allowed is None or PLUGIN_NAME in [name.strip() for name in allowed.split(",")]


def check_engine_settings(dtype: str) -> None:
    """Refuse a CPU engine setting that would crash the engine's worker on its first request."""
    if dtype not in ("bfloat16", "bf16") or not amx_tiles_reported():
        return
    if not request_amx_permission():
        raise EngineSettingsError(
            "this CPU reports AMX tiles but the kernel refuses AMX permission, and vLLM's bf16 CPU attention "
            "uses AMX: set SCULPTOR_ENGINE_DTYPE=float32 (or run on a kernel >= 5.16 with AMX enabled)")
    if not plugin_enabled():
        raise EngineSettingsError(
            f"VLLM_PLUGINS is set without {PLUGIN_NAME!r}, so vLLM's worker processes would not request AMX "
            f"permission and would die with SIGILL on the first bf16 request: add {PLUGIN_NAME} to "
            "VLLM_PLUGINS, or set SCULPTOR_ENGINE_DTYPE=float32")
