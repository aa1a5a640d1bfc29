"""Threads and compilation: the cached thread pool of the (de)gridder, the even/odd
split helper, and compilation of the generated loops with LLVM's SLP vectoriser.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numba
from numba.core.compiler_lock import global_compiler_lock


def _split(x, n):
    return [(i * x) // n for i in range(n + 1)]


@functools.lru_cache(maxsize=8)
def _pool(nthreads):
    return ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="contimg-grid")


def _map(nthreads, fn, items):
    """Run ``fn`` over ``items`` on ``nthreads`` threads (the numba kernels drop the GIL)."""
    if nthreads <= 1 or len(items) <= 1:
        return [fn(it) for it in items]
    return list(_pool(int(nthreads)).map(fn, items))


_READY = set()


def _compiled(fn, args):
    """``fn`` compiled for ``args``' types with LLVM's SLP vectoriser switched on.

    numba leaves SLP vectorisation off by default; the generated tap loops of
    ``kernels.gridding._loops`` need it (2-4x faster). The switch is a process-wide
    setting read at compilation: it is flipped only while this one signature is compiled
    (or loaded from numba's on-disk cache), under numba's own compiler lock, so no other
    thread's compilation can see it flipped.
    """
    if not hasattr(fn, "compile"):  # NUMBA_DISABLE_JIT: plain Python
        return fn
    key = (fn, tuple(numba.typeof(a) for a in args))
    if key in _READY:
        return fn
    with global_compiler_lock:  # re-entrant: fn.compile takes it again
        if key not in _READY:
            old = numba.config.SLP_VECTORIZE
            numba.config.SLP_VECTORIZE = 1
            try:
                fn.compile(key[1])
            finally:
                numba.config.SLP_VECTORIZE = old
            _READY.add(key)
    return fn
