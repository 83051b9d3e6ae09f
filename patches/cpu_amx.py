"""Patch (x86 CPUs with AMX): ask Linux for the AMX tile permission before
vLLM's AMX kernels run, in every process that loads the plugin.

Linux hands AMX tile data to a process only after it asks
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); the first tile
instruction of a process that has not asked raises #UD, i.e. SIGILL
(exit code -4). vLLM 0.32 CPU picks its AMX kernels from CPUID alone
(``torch.cpu._is_amx_tile_supported()``: the "amx" attention ISA, and the SGL
``weight_packed_linear`` GEMM for every weight under 1 MiB) and never asks.
A worker survives only when something else asked first: oneDNN does when it
builds a primitive for a weight over 1 MiB (a 21M-parameter target has such
weights; the test zoo's 128-wide models do not), and the permission is
inherited across fork but reset by exec. vLLM CPU starts its workers with
``spawn`` (exec), so a worker whose model has only small weights, started
without an inherited permission, dies at its first decode step. That is the
worker death of the two-Ray-replica test on AMX hosts
(``Worker proc VllmWorker-0 died unexpectedly (exit code: -4)``).

The fix asks for the permission when the plugin loads (``torch.cpu._init_amx``,
PyTorch's own call for this). If Linux refuses (for example an alternate signal
stack too small for the tile state in some thread), vLLM is told AMX is absent
in this process, so it picks its AVX-512 kernels instead of crashing.
A no-op on CPUs without AMX and on GPUs.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("vllm.metasd")


def apply() -> None:
    cpu = getattr(torch, "cpu", None)
    if cpu is None or not cpu._is_amx_tile_supported():
        return
    if cpu._init_amx():
        return
    logger.warning("MetaSD: Linux refused this process the AMX tile permission "
                   "(arch_prctl ARCH_REQ_XCOMP_PERM); vLLM's AMX kernels are "
                   "disabled here so they cannot raise SIGILL")
    cpu._is_amx_tile_supported = lambda: False
