"""Dask settings contimg's workload needs, applied when contimg is imported.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that glibc hands
freed memory back to the OS at once. Setting any ``MALLOC_*`` threshold also switches
off glibc's dynamic mmap threshold, so every block of a subband (tens of MB, allocated
and freed per block) is mapped fresh and page-faulted in again: measured on a full
DSA-110 group, the conversion's writer task takes 4.0 s instead of 2.6 s. contimg unsets
it for the worker processes it (or the user, after importing contimg) starts; the
setting is left alone when the user configured a different value.
``deploy/dask.yaml`` does the same for the telescope's workers.
"""

from __future__ import annotations

import logging

import dask

log = logging.getLogger(__name__)

_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


def apply():
    # before ``distributed`` is imported its defaults are not in the config yet (None
    # here); they are merged later without overriding what is set now
    current = dask.config.get(_KEY, default=None)
    if current in (None, 65536, "65536"):
        dask.config.set({_KEY: None})
        log.debug("unset %s for worker processes", _KEY)


apply()
