"""AMX permission for vLLM's CPU engine (service/engines/amx.py).

On an AMX CPU, vLLM's bf16 attention executes tile instructions, which Linux allows only after
arch_prctl(ARCH_REQ_XCOMP_PERM). These tests check, in fresh processes (the permission is per process),
that vLLM's own plugin loader makes that request through Sculptor's plugin, and that a setting that
would still crash is refused with the setting to change. The end-to-end proof is the bf16 + eager
engine in tests/test_hotswap.py, which died with SIGILL on AMX CPUs before the plugin existed.
"""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

from service.engines import amx

needs_amx = pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="this CPU has no AMX tiles")

# Prints whether this process may use AMX tile data (XFEATURE_XTILEDATA, bit 18 of ARCH_GET_XCOMP_PERM).
TILE_PERMISSION = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
features = ctypes.c_uint64(0)
assert libc.syscall(158, 0x1022, ctypes.byref(features)) == 0  # SYS_arch_prctl, ARCH_GET_XCOMP_PERM
print(bool(features.value & (1 << 18)))
"""


def run_python(code: str, **env) -> str:
    import os

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_plugin_is_registered_with_vllm():
    plugins = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert amx.PLUGIN_NAME in plugins
    assert plugins[amx.PLUGIN_NAME].load() is amx.vllm_plugin


@needs_amx
def test_vllm_plugin_loader_grants_amx_to_a_fresh_process():
    assert run_python(TILE_PERMISSION) == "False"  # a process starts without the permission
    loaded = "from vllm.plugins import load_general_plugins; load_general_plugins()\n" + TILE_PERMISSION
    assert run_python(loaded) == "True"
    assert run_python(loaded, VLLM_PLUGINS="some_other_plugin") == "False"  # what the check below refuses


@needs_amx
def test_bf16_engine_refused_when_vllm_plugins_excludes_the_plugin(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    with pytest.raises(amx.EngineSettingsError, match="SCULPTOR_ENGINE_DTYPE=float32"):
        amx.check_engine_settings("bfloat16")
    amx.check_engine_settings("float32")  # fp32 kernels use no AMX
    monkeypatch.setenv("VLLM_PLUGINS", f"x,{amx.PLUGIN_NAME}")
    amx.check_engine_settings("bfloat16")


@needs_amx
def test_bf16_engine_refused_when_the_kernel_refuses_amx(monkeypatch):
    monkeypatch.setattr(amx, "request_amx_permission", lambda: False)
    with pytest.raises(amx.EngineSettingsError, match="refuses AMX permission"):
        amx.check_engine_settings("bfloat16")


def test_no_amx_cpu_needs_nothing(monkeypatch):
    monkeypatch.setattr(amx, "amx_tiles_reported", lambda: False)
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    amx.check_engine_settings("bfloat16")
