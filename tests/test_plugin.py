"""The plugin: entry point, version check, idempotent patching."""
from importlib.metadata import entry_points

import pytest


def test_entry_point_registered():
    eps = entry_points(group="vllm.general_plugins")
    assert any(ep.name == "metasd" and ep.value == "vllm_metasd.plugin:register" for ep in eps)


def test_untested_vllm_version_is_refused_with_the_supported_one_named():
    from vllm_metasd.patches import UnsupportedVLLMVersion, check_vllm_version

    check_vllm_version("0.32.0")
    with pytest.raises(UnsupportedVLLMVersion, match=r"supports vLLM 0\.32\.0 only, found vLLM 0\.33\.1"):
        check_vllm_version("0.33.1")


def test_patches_apply_once_and_are_idempotent():
    from vllm.v1.sample import rejection_sampler as rs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_metasd.patches import apply_all
    from vllm_metasd.patches._util import original

    first = apply_all()
    fn = rs.rejection_sample
    assert apply_all() == first
    assert rs.rejection_sample is fn and original(fn) is not fn
    assert original(GPUModelRunner._sample) is not GPUModelRunner._sample


def test_metasd_engines_run_on_the_v1_model_runner(monkeypatch):
    from types import SimpleNamespace

    from vllm.config import VllmConfig

    from vllm_metasd.patches import apply_all

    apply_all()
    metasd = SimpleNamespace(speculative_config=SimpleNamespace(metasd={"drafters": []}))
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    assert VllmConfig.use_v2_model_runner.fget(metasd) is False
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=1"):
        VllmConfig.use_v2_model_runner.fget(metasd)


def test_speculative_config_cli_accepts_a_metasd_json_path(tmp_path):
    import json

    from vllm_metasd.patches.cli import rewrite_argv

    metasd = tmp_path / "metasd.json"
    metasd.write_text('{"num_speculative_tokens": 3, "drafters": []}')
    builtin = tmp_path / "ngram.json"
    builtin.write_text('{"method": "ngram", "num_speculative_tokens": 3}')
    inline = '{"method": "metasd", "config": "metasd.json"}'
    argv = ["vllm", "serve", "m", "--speculative-config", str(metasd), "--port", "1",
            f"-sc={builtin}", "--speculative-config", inline]
    out = rewrite_argv(argv)
    assert json.loads(out[4]) == {"method": "metasd", "config": str(metasd)}
    assert out[5:7] == ["--port", "1"]
    assert json.loads(out[7].removeprefix("-sc=")) == {"method": "ngram",
                                                       "num_speculative_tokens": 3}
    assert out[9] == inline
    assert rewrite_argv(out) == out  # idempotent
    missing = rewrite_argv(["--speculative-config", "nope/metasd.json"])[1]
    assert json.loads(missing)["config"].endswith("nope/metasd.json")


def _amx_state() -> tuple[bool, bool]:
    """In a fresh (spawned) process with the plugin loaded: (vLLM sees AMX,
    Linux lets this process use AMX tile data)."""
    import ctypes

    import torch

    from vllm_metasd.plugin import register

    register()
    bits = ctypes.c_uint64(0)
    # arch_prctl(ARCH_GET_XCOMP_PERM): the extended states this process may use.
    ctypes.CDLL(None, use_errno=True).syscall(158, 0x1022, ctypes.byref(bits))
    return bool(torch.cpu._is_amx_tile_supported()), bool(bits.value >> 18 & 1)


def test_vllm_never_sees_amx_without_the_tile_permission():
    """vLLM CPU picks AMX kernels from CPUID alone and starts its workers by
    exec (spawn), which resets the permission: a worker that runs a tile
    instruction before asking dies with SIGILL (patches/cpu_amx.py)."""
    import concurrent.futures
    import multiprocessing
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("AMX is x86 only")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        sees_amx, permitted = pool.submit(_amx_state).result(timeout=120)
    assert permitted or not sees_amx
