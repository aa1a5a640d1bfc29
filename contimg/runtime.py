"""Process settings contimg's workload needs, applied by :func:`configure` (never at import).

Called by the command line, by :class:`contimg.stream.Stream` and, as a Dask worker
preload (``--preload contimg.runtime``, ``distributed.worker.preload`` in
``deploy/dask.yaml``, and the LocalCluster the CLI starts), in every worker. Jupyter
users call it once themselves. Idempotent; what it does:

* **Dask**: the nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that glibc
  hands freed memory back to the OS at once. Setting any ``MALLOC_*`` threshold also
  switches off glibc's dynamic mmap threshold, so every block of a subband (tens of MB,
  allocated and freed per block) is mapped fresh and page-faulted in again: measured on
  a full DSA-110 group, the conversion's writer task takes 4.0 s instead of 2.6 s.
  ``configure`` unsets it for the worker processes started afterwards by this process,
  unless the user configured a different value.
* **astropy offline**: python-casacore ships its own measures data; astropy must use its
  bundled IERS tables without trying to refresh them (the telescope and CI have no
  network), and not fail once the table is old (:func:`astropy_offline`, also called
  by the functions that need the tables).
* **umask**: from ``[paths] product_mode`` (:func:`product_umask`): nothing this
  process creates is world-writable, whatever umask it was started with.
* **HDF5**: ``HDF5_USE_FILE_LOCKING=FALSE`` unless set (subband files are read while the
  correlator may still hold them); see :func:`contimg.config.ensure_environment`.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_MALLOC_KEY = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


def dask_settings() -> None:
    """Unset dask's default ``MALLOC_TRIM_THRESHOLD_`` for worker processes (see above)."""
    import dask

    # before ``distributed`` is imported its defaults are not in the config yet (None
    # here); they are merged later without overriding what is set now
    current = dask.config.get(_MALLOC_KEY, default=None)
    if current in (None, 65536, "65536"):
        dask.config.set({_MALLOC_KEY: None})


_TRIM = None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere
    nothing). Called between the big computes of a stage (calibration passes, imaging
    major cycles): glibc keeps pages of freed arrays of a few MB in its arenas (the
    dynamic mmap threshold, see above), and the next compute's peak lands on top."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def astropy_offline() -> None:
    """Keep astropy offline: no IERS downloads, and no failure once the table is old."""
    from astropy.utils import iers

    iers.conf.auto_download = False
    iers.conf.auto_max_age = None


def product_umask() -> None:
    """The process umask follows ``[paths] product_mode`` (``0644``: umask ``022``), so
    that what libraries add to a product later (casacore's new column files in an MS)
    is never more open than products are (see :mod:`contimg.io.files`)."""
    from contimg.io.files import apply_umask

    apply_umask()


def configure() -> None:
    """Apply every process setting above; safe to call any number of times."""
    from contimg.config import ensure_environment

    dask_settings()
    astropy_offline()
    ensure_environment()
    product_umask()
    log.debug("contimg runtime configured")


def dask_setup(worker=None) -> None:
    """Dask's preload hook: a worker started with ``--preload contimg.runtime``."""
    configure()
