"""The compact averaged store on disk that CLEAN's major cycles stream (``[image] spill``).

Without it, an image keeps its averaged Stokes I rows and their gridding index in
(distributed) memory from the first pass to the last major cycle: a few GB for a full
DSA-110 group, growing with the group. With it (the default), the rows are written
once to a directory of parts (:mod:`graphs.image_store`), every pass streams them back
one part at a time, and each part keeps its own imaging weights and gridding index
next to it. Memory then grows with a part and the image, not with the group; the
parts are re-read from the page cache (or the disk) at each pass.

The store lives in a temporary directory (``dir``: its parent, default the system's
temporary directory; on a multi-node cluster it must be visible to every worker) and
is removed when the image is done (:meth:`ImagingStore.close`, ``with``, or when the
store object is dropped, e.g. after an error).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from pathlib import Path

from graphs import scheduling

log = logging.getLogger(__name__)

__all__ = ["ImagingStore", "ROWS_PER_PART"]

#: rows per part (~44 bytes each plus the index: ~100 MB in flight per gridding task)
ROWS_PER_PART = 1 << 20


class ImagingStore:
    """Averaged rows of one image on disk: :meth:`write` them, then :meth:`dataset`
    (a lazy row Dataset over the parts) and :meth:`groups` (parts per gridding task)."""

    def __init__(self, dir=None, rows_per_part: int | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="contimg-store-", dir=dir))
        # removed at close(), or when the store is dropped (an image that failed)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.root), True)
        self.rows_per_part = int(rows_per_part or ROWS_PER_PART)
        self.parts: list = []
        self.attrs: dict = {}

    def write(self, dsr) -> "ImagingStore":
        """Compute the row Dataset ``dsr`` (:func:`graphs.image.average_dataset`) into
        the store: one task per chunk, each read once and written as parts."""
        from graphs.image_store import spill_rows

        t0 = time.perf_counter()
        lists = scheduling.compute(*spill_rows(dsr, self.root, self.rows_per_part))
        self.parts = [p for lst in lists for p in lst]
        self.attrs = dict(dsr.attrs)
        log.info("averaged rows spilled to %s: %d rows in %d parts, %.0f MB, %.1f s",
                 self.root, self.nrows, len(self.parts), self.nbytes() / 2 ** 20,
                 time.perf_counter() - t0)
        return self

    @property
    def nrows(self) -> int:
        return sum(n for _, n in self.parts)

    def nbytes(self) -> int:
        """Bytes on disk (rows, and the weights and indices once made)."""
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())

    def dataset(self):
        """The rows as a lazy Dataset, one chunk per part (read when a task needs it)."""
        from graphs.image_store import open_rows

        return open_rows(self.parts, self.attrs)

    def groups(self, ntask: int) -> list:
        """The parts' directories in at most ``ntask`` groups (one gridding task each)."""
        from graphs.image_store import part_groups

        return part_groups(self.parts, ntask)

    def close(self):
        self._cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
