"""numba's ``njit`` for the core's kernels, applied on the first call."""
from __future__ import annotations

import functools


def njit(**options):
    """numba's ``njit``, applied on the first call. Importing numba loads
    llvmlite, and vLLM 0.32's CPU worker, which scans every loaded module for
    kernels to rebind when it starts, fails on an llvmlite object; this
    package is imported when the plugin loads, before the worker starts."""
    def decorate(fn):
        compiled = None

        @functools.wraps(fn)
        def call(*args):
            nonlocal compiled
            if compiled is None:
                from numba import njit as numba_njit

                compiled = numba_njit(**options)(fn)
            return compiled(*args)

        return call

    return decorate
