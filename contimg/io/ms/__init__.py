"""CASA Measurement Set (MSv2) I/O for the visibility Dataset contract.

:func:`write_ms` writes a contract Dataset (numpy- or dask-backed) to a Measurement Set
with python-casacore, one chunk at a time; :func:`open_ms` opens any single-spectral-
window, single-polarization-setup MS lazily (through dask-ms) as the same contract.

Modules: :mod:`~contimg.io.ms.read` (:func:`open_ms`, in named steps),
:mod:`~contimg.io.ms.write` (:func:`write_ms`: temporary path, then rename),
:mod:`~contimg.io.ms.plan` (what a write needs, computed once; block preparation),
:mod:`~contimg.io.ms.main_table` (MAIN's description and its filling, block by block),
:mod:`~contimg.io.ms.subtables` (one function per subtable),
:mod:`~contimg.io.ms.fields` (:func:`ms_fields`, field selection by id or name),
:mod:`~contimg.io.ms.measures` (measure references -> the contract's frames),
:mod:`~contimg.io.ms.common` (names both directions share).

Conventions, settled here and checked by ``tests/test_ms.py``
-------------------------------------------------------------

Baseline conjugation
    The Dataset follows pyuvdata/UVH5: ``uvw = x2 - x1``, ``V12 = <E1 E2*>`` and
    ``V = S exp(+2 pi i (u l + v m + w (n - 1)) / lambda)`` (the sign pyuvdata's own
    ``UVData.phase`` implies, and what ``kernels.predict`` simulates).
    The MS gets the opposite ("ant1 - ant2") convention, as pyuvdata >= 3 writes it
    (``UVData.write_ms(flip_conj=True)``, after its authors traced CASA's own
    conventions; pyuvdata issues #1355, #1540): ``MS UVW = -UVW`` and
    ``MS DATA = conj(VISIBILITY)``, i.e. ``DATA = S exp(+2 pi i UVW_ms . (l, m, n-1))``
    with ``UVW_ms = x1 - x2``. Checked by the interop test: WSClean 3.1 images our MS,
    and the MS pyuvdata writes from the same visibilities, with the source on its
    true pixel (the opposite sign, ``exp(-2 pi i ...)`` with ``uvw = x2 - x1``, puts
    it at the mirror position through the phase centre). Imaging cannot tell the two
    Hermitian forms apart, calibration can: this is the form pyuvdata's authors found
    CASA's calibration tasks to assume. pyuvdata reads our MS back into its own
    convention, bit for bit (the files carry no ``pyuvdata_flip_conj`` keyword, so
    it assumes the MS convention; interop test). :func:`open_ms` undoes the flip;
    an MS pyuvdata 2.x wrote (its own convention: a pyuvdata HISTORY row and no
    ``pyuvdata_flip_conj`` keyword, or that keyword False) is read as stored
    (``conjugation="auto"|"ms"|"pyuvdata"``; the Dataset attr ``ms_conjugation``).

FIELD
    One FIELD row per *distinct* phase centre, in order of first use. DSA-110 data are
    phased to the meridian at every integration, so a group gives one field per
    integration, as today's pipeline writes it (``FIELD_ID`` = integration index).
    A Dataset phased to one centre (e.g. rephased to the group midpoint) gives one
    field. Imagers that take one field by default (WSClean: ``-field 0``) must be told
    which fields to use; note that WSClean images all selected fields on the first
    field's phase centre without rephasing, so drift-scan data should be rephased to
    a common centre before imaging a whole group with it. Directions are written with
    the ``ICRS`` measure reference (the contract's frame), UVW likewise.

Telescope name
    ``OBSERVATION.TELESCOPE_NAME`` is ``ds.attrs["telescope_name"]`` except that
    ``"DSA-110"`` is written as ``"DSA_110"``, the name today's pipeline writes
    (its ``PIPELINE_TELESCOPE_NAME`` default); :func:`open_ms` maps it back. The array
    centre goes in pyuvdata's non-standard ``OBSERVATION.TELESCOPE_LOCATION`` column
    (so pyuvdata and :func:`open_ms` recover it; CASA ignores it).

Times and weights
    ``TIME`` = ``TIME_CENTROID`` = unix seconds + ``MJD_UNIX_OFFSET_S`` (MJD seconds,
    UTC, integration centre; :mod:`kernels.constants`); ``INTERVAL`` = ``EXPOSURE`` =
    ``time.attrs["integration_time"]``.
    Round trip of ``time`` is exact to the float64 rounding of that sum (< 1 us).
    On reading, TIME in another reference (TAI, TT, ...: its MEASINFO) is converted
    to UTC, and FIELD directions in other fixed frames to ICRS
    (:mod:`~contimg.io.ms.measures`).
    ``WEIGHT_SPECTRUM`` is the contract's ``WEIGHT``; the row ``WEIGHT`` is its mean
    over channels and ``SIGMA = 1/sqrt(WEIGHT)`` (0 where the weight is 0, as CASA
    does); ``FLAG_ROW`` is set where every channel and correlation is flagged.

Storage
    Rows are time-major with baselines in Dataset order inside each integration.
    DATA, FLAG, WEIGHT_SPECTRUM (and MODEL_DATA/CORRECTED_DATA) use
    TiledColumnStMan with tiles of (all correlations, one Dataset frequency chunk,
    ~1 MiB of complex data in rows), so each (time chunk, frequency chunk) of the
    Dataset is one ``putcolslice`` into one column of tiles; UVW is tiled too;
    slowly varying scalar columns use IncrementalStMan. Memory: about three chunks
    (the one being written, its conjugated copy, the next one being computed).

Safety
    The MS is built at ``<path>.tmp-<pid>`` and renamed into place at the end; on any
    exception the temporary directory is removed and nothing appears at ``path``
    (a process killed outright leaves only its ``.tmp-<pid>`` directory). With
    ``overwrite=True`` the old MS is replaced only once the new one is complete.
    casacore caches open tables by name: readers of the old MS still open in this
    process (e.g. an :func:`open_ms` Dataset) keep seeing the old files, so drop them
    before overwriting (a warning is logged when dask-ms still holds one).
    All casacore calls of one write happen in the calling thread (python-casacore is
    not thread-safe); a single helper thread only *computes* the next Dataset chunk
    (dask) while the current one is written.
"""

from contimg.io.ms.common import (
    CORR_LABEL,
    CORR_TYPE,
    MJD_UNIX_OFFSET_S,
    MS_TELESCOPE_NAMES,
    VISIBILITY_CONVENTION,
    MSFormatError,
    UnknownFieldError,
)
from contimg.io.ms.fields import ms_fields
from contimg.io.ms.plan import prepare_ms_block, single_block
from contimg.io.ms.read import open_ms
from contimg.io.ms.write import write_ms
from contimg.uvw import compute_uvw

__all__ = [
    "VISIBILITY_CONVENTION",
    "write_ms",
    "open_ms",
    "compute_uvw",
    "MJD_UNIX_OFFSET_S",
    "MSFormatError",
    "UnknownFieldError",
    "ms_fields",
    "prepare_ms_block",
    "single_block",
    "CORR_TYPE",
    "CORR_LABEL",
    "MS_TELESCOPE_NAMES",
]
