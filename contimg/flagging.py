"""Flag an existing Measurement Set in place (``contimg flag PATH.ms``), with a backup.

:func:`flag_ms` opens the MS with :func:`contimg.io.ms.open_ms` (dask-ms, lazily), runs
the RFI flagger :func:`graphs.flag.flag_dataset` on it and writes ``FLAG = old | new``
and ``FLAG_ROW`` back into the MS, block by block, as the graph produces them. It
returns (and, with ``summary_path``, writes as JSON) the per-group flag summary that
later stages and the operator app show: the flagged fraction per antenna (by name),
per channel, per integration and overall, before and after.

Backups: CASA's flag-versions layout
------------------------------------
Before the first byte of the MS changes, the current ``FLAG`` and ``FLAG_ROW`` are
saved as a *flag version*, exactly as CASA's ``flagmanager(mode="save")`` (and
``flagdata``'s automatic backups) write them::

    <ms>.flagversions/FLAG_VERSION_LIST     one line per version: "<name> : <comment>"
    <ms>.flagversions/flags.<name>/         a casacore table with the MS's row count:
                                            FLAG (Bool, 2-d, TiledShapeStMan
                                            "TiledFlag", tiles of ncorr x nchan x
                                            8 Mibit/(ncorr nchan) rows) and
                                            FLAG_ROW (Bool, StandardStMan)

(casacore ``tableplot``/``flagging`` ``FlagVersion::saveFlagVersion``; checked against
the tables CASA 6.7's flagmanager writes, and CASA's flagmanager lists and restores
the versions written here: ``tests/test_flag_ms.py``). So operators can roll back
with either ``restore_flags(ms, name)`` or CASA's ``flagmanager(vis=ms,
mode="restore", versionname=name)``. The default version name follows flagdata's
``flagdata_1, flagdata_2, ...``: ``contimg_flag_1``, ``contimg_flag_2``, ...

Never half-written
------------------
The previous flags are always saved before writing (with ``backup=False`` into a
temporary version that is deleted afterwards), and the MS carries the keyword
``CONTIMG_FLAG_PENDING = <version>`` while its flags are being rewritten. On any
exception (including KeyboardInterrupt) the flags are restored from that version
before the exception propagates (and the version, now redundant, is removed); if the
process dies outright (SIGKILL, power), the keyword is still there and the next
:func:`flag_ms` (or :func:`recover_flags`) restores the version first. Writing into a
temporary column and swapping columns was the alternative; it changes the MS's data
managers, and the swap itself (two renames) is not atomic either, whereas restoring
from the backup reuses what must exist anyway.

Threads and memory
------------------
python-casacore is not thread-safe, so every casacore call on the MS goes through
dask-ms's per-table executor (one thread per table, shared with dask-ms's own reads
of the same MS): the backup, the block writes, FLAG_ROW, the restore. The flagging
graph runs on the local threaded scheduler (the MS is a file on this machine); a
block of new flags is written as soon as it is computed and then dropped, so the
write side holds only the blocks in flight (one per scheduler thread). Writes cannot
start before every read is done: each output block depends on the array-wide
antenna/channel/integration decisions, which depend on every input block. Until those
decisions are made, each block's flags wait as one bit per visibility in a file beside
the MS (``<ms>.contimg-flagbits-<host>-<pid>-<token>/``, removed at the end; see
:class:`_BitFiles`), so the flagger's memory is the blocks in flight, not the group.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import socket
import time as _time
import uuid
from pathlib import Path

import numpy as np

from contimg.io.ms import MSFormatError, open_ms
from contimg.io.mscolumns import StoreTarget, get_cells, put_block, put_flag_row, read_layout
from contimg.io.mscolumns import ms_proxy as _proxy
from contimg.io.mscolumns import run_in_table as _run

__all__ = [
    "flag_ms",
    "restore_flags",
    "recover_flags",
    "save_flags",
    "list_flag_versions",
    "delete_flag_version",
    "write_flag_summary",
    "summary_part",
    "summary_record",
    "flag_versions_dir",
    "default_summary_path",
    "FLAG_VERSIONS_SUFFIX",
    "PENDING_KEYWORD",
]

log = logging.getLogger(__name__)

#: CASA's flag-versions directory is ``<ms><suffix>``.
FLAG_VERSIONS_SUFFIX = ".flagversions"
_VERSION_LIST = "FLAG_VERSION_LIST"
#: MS keyword naming the version to restore while the flags are being rewritten.
PENDING_KEYWORD = "CONTIMG_FLAG_PENDING"
_TMP_PREFIX = "contimg_tmp_"
_COPY_BYTES = 64 << 20          # rows per copy step of a backup/restore: ~64 MiB of flags


# ---------------------------------------------------------------------------------
# paths, validation and the table thread
# ---------------------------------------------------------------------------------

def flag_versions_dir(path) -> str:
    """``<ms>.flagversions`` (CASA's name) of an MS path."""
    return os.path.abspath(os.fspath(path)).rstrip("/") + FLAG_VERSIONS_SUFFIX


def _ms_path(path) -> str:
    """Absolute path of an existing MS directory, or a clear error naming it."""
    p = os.path.abspath(os.fspath(path)).rstrip("/")
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{p}: no such Measurement Set")
    if not os.path.isdir(p) or not os.path.isfile(os.path.join(p, "table.dat")):
        raise MSFormatError(f"{p}: not a Measurement Set (not a casacore table directory)")
    return p


def _check_main(tb, path):
    """(nrow, (nchan, ncorr), has FLAG_ROW); errors name the file."""
    keywords = tb.getkeywords()
    if "SPECTRAL_WINDOW" not in keywords or "ANTENNA" not in keywords:
        raise MSFormatError(f"{path}: not a Measurement Set (a casacore table without "
                            "ANTENNA/SPECTRAL_WINDOW subtables)")
    cols = set(tb.colnames())
    if "FLAG" not in cols:
        raise MSFormatError(f"{path}: no FLAG column in the MAIN table")
    nrow = tb.nrows()
    if nrow == 0:
        raise MSFormatError(f"{path}: the MAIN table has no rows")
    if not tb.iscelldefined("FLAG", 0):
        raise MSFormatError(f"{path}: the FLAG column holds no data")
    shape = tuple(int(s) for s in tb.getcell("FLAG", 0).shape)
    has_row = "FLAG_ROW" in cols
    return nrow, shape, has_row


# ---------------------------------------------------------------------------------
# flag versions (CASA layout)
# ---------------------------------------------------------------------------------

def _read_version_list(vdir):
    """[(name, comment)] from FLAG_VERSION_LIST (missing file: none)."""
    listfile = os.path.join(vdir, _VERSION_LIST)
    out = []
    if not os.path.isfile(listfile):
        return out
    with open(listfile) as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            name, sep, comment = line.partition(" : ")
            if not sep:  # tolerate "name :" (CASA writes "name : " for no comment)
                name, comment = line.rstrip(" :"), ""
            out.append((name.strip(), comment))
    return out


def _write_version_list(vdir, versions):
    listfile = os.path.join(vdir, _VERSION_LIST)
    tmp = f"{listfile}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        for name, comment in versions:
            fh.write(f"{name} : {comment}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, listfile)


def _valid_version_name(name):
    name = str(name)
    if not name or name != name.strip() or "/" in name or " : " in name or "\n" in name:
        raise ValueError(f"invalid flag version name {name!r}")
    return name


def _copy_rows(src, dst, nrow, cell_size, has_row):
    step = max(1, _COPY_BYTES // max(cell_size, 1))
    for r0 in range(0, nrow, step):
        n = min(step, nrow - r0)
        dst.putcol("FLAG", src.getcol("FLAG", startrow=r0, nrow=n), startrow=r0, nrow=n)
    if has_row:
        dst.putcol("FLAG_ROW", src.getcol("FLAG_ROW"))


def _save_version(tb, path, name, comment):
    """In the table thread: save FLAG/FLAG_ROW of ``tb`` as flag version ``name``."""
    from casacore import tables as ct

    nrow, (nchan, ncorr), has_row = _check_main(tb, path)
    vdir = flag_versions_dir(path)
    os.makedirs(vdir, exist_ok=True)
    versions = _read_version_list(vdir)
    if name in [v for v, _ in versions]:
        raise FileExistsError(f"{path}: flag version {name!r} already exists in {vdir}")
    target = os.path.join(vdir, f"flags.{name}")
    tmp = f"{target}.tmp-{os.getpid()}"
    for stale in (tmp, target):  # a table left by a run that died before listing it
        if os.path.lexists(stale):
            shutil.rmtree(stale)
    fdesc = ct.makearrcoldesc("FLAG", False, ndim=2, valuetype="boolean",
                              datamanagertype="TiledShapeStMan",
                              datamanagergroup="TiledFlag")
    rdesc = ct.makescacoldesc("FLAG_ROW", False, valuetype="boolean",
                              datamanagertype="StandardStMan",
                              datamanagergroup="StandardStMan")
    td = ct.maketabdesc([fdesc, rdesc] if has_row else [fdesc])
    ct.tabledefinehypercolumn(td, "TiledFlag", 3, ["FLAG"])
    tile_rows = max(1, (8 * (1 << 20)) // (ncorr * nchan))  # CASA: 1 MiB of bits per tile
    dminfo = ct.makedminfo(td, {"TiledFlag": {
        "DEFAULTTILESHAPE": np.array([ncorr, nchan, tile_rows], dtype=np.int32)}})
    try:
        ft = ct.table(tmp, td, nrow=nrow, dminfo=dminfo, ack=False, readonly=False)
        try:
            _copy_rows(tb, ft, nrow, nchan * ncorr, has_row)
            ft.flush()
        finally:
            ft.close()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_version_list(vdir, versions + [(name, comment)])
    log.info("%s: saved flag version %r (%d rows) in %s", path, name, nrow, vdir)
    return target


def _restore_version(tb, path, name):
    """In the table thread: copy flag version ``name`` back into ``tb``."""
    from casacore import tables as ct

    nrow, (nchan, ncorr), has_row = _check_main(tb, path)
    vdir = flag_versions_dir(path)
    names = [v for v, _ in _read_version_list(vdir)]
    target = os.path.join(vdir, f"flags.{name}")
    if name not in names or not os.path.isfile(os.path.join(target, "table.dat")):
        raise KeyError(f"{path}: no flag version {name!r} in {vdir} (versions: {names})")
    ft = ct.table(target, ack=False)
    try:
        if ft.nrows() != nrow:
            raise MSFormatError(f"{target}: {ft.nrows()} rows, but {path} has {nrow}")
        shape = tuple(int(s) for s in ft.getcell("FLAG", 0).shape)
        if shape != (nchan, ncorr):
            raise MSFormatError(f"{target}: FLAG cells of shape {shape}, but {path} has "
                                f"{(nchan, ncorr)}")
        _copy_rows(ft, tb, nrow, nchan * ncorr, has_row and "FLAG_ROW" in ft.colnames())
    finally:
        ft.close()
    tb.flush()
    log.info("%s: restored flag version %r", path, name)


def _delete_version(path, name):
    vdir = flag_versions_dir(path)
    versions = _read_version_list(vdir)
    if name not in [v for v, _ in versions]:
        raise KeyError(f"{path}: no flag version {name!r} in {vdir}")
    _write_version_list(vdir, [(v, c) for v, c in versions if v != name])
    shutil.rmtree(os.path.join(vdir, f"flags.{name}"), ignore_errors=True)


def _get_pending(tb):
    kw = tb.getkeywords()
    return str(kw[PENDING_KEYWORD]) if PENDING_KEYWORD in kw else None


def _set_pending(tb, name):
    if name is None:
        if PENDING_KEYWORD in tb.getkeywords():
            tb.removekeyword(PENDING_KEYWORD)
    else:
        tb.putkeyword(PENDING_KEYWORD, name)
    tb.flush()


def list_flag_versions(path) -> list[dict]:
    """The MS's flag versions, oldest first: ``[{"name", "comment", "path"}]``."""
    ms = _ms_path(path)
    vdir = flag_versions_dir(ms)
    return [dict(name=n, comment=c, path=os.path.join(vdir, f"flags.{n}"))
            for n, c in _read_version_list(vdir)]


def save_flags(path, name, comment="") -> str:
    """Save the MS's current FLAG/FLAG_ROW as flag version ``name`` (CASA layout).

    Like ``flagmanager(mode="save")``, except that an existing name is an error
    (FileExistsError) rather than silently overwritten. Returns the version's path.
    """
    ms = _ms_path(path)
    name = _valid_version_name(name)
    proxy = _proxy(ms)
    return _run(proxy, _save_version, ms, name, str(comment).replace("\n", " "))


def restore_flags(path, name, *, delete=False) -> None:
    """Roll the MS's FLAG and FLAG_ROW back to flag version ``name`` (exactly).

    Also clears an interrupted :func:`flag_ms` marker. ``delete=True`` removes the
    version afterwards. KeyError (naming the versions there are) if it does not exist.
    """
    ms = _ms_path(path)
    name = _valid_version_name(name)
    proxy = _proxy(ms)
    _run(proxy, _restore_version, ms, name)
    _run(proxy, _set_pending, None)
    if delete:
        _delete_version(ms, name)


def delete_flag_version(path, name) -> None:
    """Remove flag version ``name`` (its table and its FLAG_VERSION_LIST line)."""
    ms = _ms_path(path)
    _delete_version(ms, _valid_version_name(name))


def recover_flags(path) -> str | None:
    """Undo an interrupted :func:`flag_ms` (process killed mid-write), if there was one.

    Restores the version named by the MS's ``CONTIMG_FLAG_PENDING`` keyword, clears
    the keyword (and deletes the version if it was a temporary one). Returns the
    version restored, or None when nothing was pending.
    """
    ms = _ms_path(path)
    return _recover(_proxy(ms), ms)


def _recover(proxy, ms):
    pending = _run(proxy, _get_pending, write=False)
    if pending is None:
        return None
    log.warning("%s: an earlier flag_ms did not finish; restoring flag version %r first",
                ms, pending)
    _run(proxy, _restore_version, ms, pending)
    _run(proxy, _set_pending, None)
    if pending.startswith(_TMP_PREFIX):
        _delete_version(ms, pending)
    return pending


def _next_version_name(ms):
    names = {v for v, _ in _read_version_list(flag_versions_dir(ms))}
    k = 1
    while f"contimg_flag_{k}" in names:
        k += 1
    return f"contimg_flag_{k}"


def _put_flag_block(tb, layout, tsl, bsl, csl, block):
    """In the table thread: write one Dataset block of FLAG into the MS."""
    return put_block(tb, layout, "FLAG", tsl, bsl, csl, np.asarray(block, dtype=bool))


def _write_block_hook(tb, layout, tsl, bsl, csl, block):
    # one indirection, so that tests can inject a failure in the middle of the writes
    return _put_flag_block(tb, layout, tsl, bsl, csl, block)


# ---------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------

def summary_part(s):
    """A computed :func:`graphs.flag.flag_summary` Dataset -> plain dict (``overall``,
    ``antenna`` {name: fraction}, ``channel`` [...], ``integration`` [...])."""
    frac_ant = np.asarray(s["flag_fraction_antenna"].values, dtype=np.float64)
    names = [str(n) for n in s["antenna_name"].values] if "antenna_name" in s.coords else [
        str(i) for i in range(frac_ant.size)]
    return {
        "overall": float(s["flag_fraction"].values),
        "antenna": {n: float(f) for n, f in zip(names, frac_ant, strict=True)
                    if np.isfinite(f)},
        "channel": [float(x) for x in np.asarray(s["flag_fraction_channel"].values)],
        "integration": [float(x) for x in np.asarray(s["flag_fraction_time"].values)],
    }


def summary_record(ms, ds, strategy: dict, *, group, after, before=None, **extra) -> dict:
    """The flag summary of an MS as ``contimg flag`` and conversion write it: what was
    flagged (``after``, and ``before`` when known: :func:`summary_part` dicts) with the
    MS's shape, frequencies and times; ``extra`` keys are added as they are."""
    out = {
        "ms": ms,
        "group": group,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in extra.items() if k != "timing_s"},
        "strategy": strategy,
        "shape": {k: int(ds.sizes[k]) for k in
                  ("time", "baseline_id", "frequency", "polarization")},
        "frequency_hz": [float(f) for f in np.asarray(ds["frequency"].values)],
        "time_unix": [float(t) for t in np.asarray(ds["time"].values)],
    }
    if before is not None:
        out["before"] = before
    out["after"] = after
    if before is not None:
        out["newly_flagged"] = after["overall"] - before["overall"]
    if "timing_s" in extra:
        out["timing_s"] = extra["timing_s"]
    return out


def write_flag_summary(summary: dict, path) -> str:
    """Write a :func:`flag_ms` summary as JSON (atomically: temp file, then rename)."""
    path = os.path.abspath(os.fspath(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------
# flag_ms
# ---------------------------------------------------------------------------------

def flag_ms(path, *, strategy=None, backup=True, backup_name=None, progress=None,
            summary_path=None, chunks=None, scheduler="threads") -> dict:
    """Flag RFI in an existing Measurement Set, in place; return the flag summary.

    Parameters
    ----------
    path : str or os.PathLike
        The MS (single spectral window, as :func:`contimg.io.ms.open_ms` reads).
    strategy : FlagStrategy, mapping, TOML path/text or None
        The flagger's configuration (:class:`graphs.flag.FlagStrategy`; None: the
        configured ``[flag]`` table, i.e. the DSA-110 defaults unless a configuration
        file changes them; see :func:`contimg.config.load_flag_strategy`).
    backup : bool
        Keep the previous flags as a CASA flag version (``<ms>.flagversions``). With
        False they are still saved first, into a temporary version deleted at the end.
    backup_name : str, optional
        Name of the version (default ``contimg_flag_<n>``, the first free n). An
        existing name raises FileExistsError before anything changes.
    progress : callable, optional
        ``progress(blocks_written, n_blocks)``, called (from a scheduler thread) after
        each block of FLAG is written.
    summary_path : str or os.PathLike, optional
        Also write the summary there as JSON.
    chunks : dict, optional
        ``open_ms`` chunks (``{"time": n, "frequency": m}``): the unit of reading and
        of writing back (default: one 48-channel subband, all integrations that fit
        in ~128 MiB of visibilities).
    scheduler : str
        dask scheduler of the flagging graph ("threads", or "sync" to debug). The MS
        is a local file whose tables must stay in this process.

    Returns
    -------
    dict
        ``ms``, ``group``, ``created_utc``, ``backup`` ({``name``, ``path``,
        ``format``} or None), ``strategy``, ``shape``, ``frequency_hz``, ``time_unix``,
        ``before`` and ``after`` (each ``overall``, ``antenna`` {name: fraction},
        ``channel`` [per ascending channel], ``integration`` [per integration]),
        ``newly_flagged`` (fraction of all samples) and ``timing_s``. An antenna's
        fraction is over all samples of the baselines it is part of.

    Raises
    ------
    FileNotFoundError, contimg.io.ms.MSFormatError
        Missing path, not an MS, no FLAG column (the message names the file).
    FileExistsError
        ``backup_name`` exists already.
    """
    import dask
    import dask.array as da

    from contimg.config import load_flag_strategy
    from graphs.flag import flag_dataset, flag_summary

    t_start = _time.perf_counter()
    timing = {}
    ms = _ms_path(path)
    st = load_flag_strategy(strategy)
    if backup_name is not None:
        backup_name = _valid_version_name(backup_name)
        if backup_name.startswith(_TMP_PREFIX):
            raise ValueError(f"backup names starting with {_TMP_PREFIX!r} are reserved")
    proxy = _proxy(ms)
    _run(proxy, _check_main, ms, write=False)
    _recover(proxy, ms)

    # --- the Dataset, its row layout and the flags before -------------------------
    t0 = _time.perf_counter()
    ds = open_ms(ms, chunks=chunks)
    layout = _run(proxy, read_layout, ms, ds, write=False)
    before = flag_summary(ds).compute(scheduler=scheduler)
    st_blocks = st
    if st.frequency_chunking == "band" and chunks is None:
        # read, flag and write back per baseline block (all integrations and channels
        # of at most baseline_block baselines), never the whole group at once; the
        # flagger's blocks are the reads' (a flag does not depend on the blocking)
        size = _block_size(st, ds)
        ds = baseline_block_dataset(proxy, ds, layout, size, name=os.path.basename(ms))
        st_blocks = dataclasses.replace(st, baseline_block=size)
    timing["open_and_summary_before"] = _time.perf_counter() - t0

    # --- backup (before anything changes) -----------------------------------------
    t0 = _time.perf_counter()
    if backup:
        name = backup_name or _next_version_name(ms)
        comment = (f"flags before contimg flag_ms "
                   f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S')}")
    else:
        name = f"{_TMP_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
        comment = "temporary backup of contimg flag_ms (deleted when it completes)"
    version_path = _run(proxy, _save_version, ms, name, comment)
    timing["backup"] = _time.perf_counter() - t0

    # --- flag and write, block by block -------------------------------------------
    # From here on, any failure restores the saved version (a no-op until the first
    # block is written) and removes it; see the module docstring.
    t0 = _time.perf_counter()
    target = None
    bits = _BitFiles(ms)
    try:
        flagged = flag_dataset(ds, st_blocks, store=bits)
        new = flagged["FLAG"].data
        target = StoreTarget(proxy, layout, int(np.prod(new.numblocks)), progress,
                             _write_block_hook)
        stored = da.store(new, target, lock=False, compute=False)
        flag_row = new.all(axis=(2, 3))
        after_lazy = flag_summary(flagged)
        _run(proxy, _set_pending, name)
        _, flag_row_np, after = dask.compute(stored, flag_row, after_lazy,
                                             scheduler=scheduler)
        timing["flag_and_write"] = _time.perf_counter() - t0
        _run(proxy, _write_flag_row_hook, layout, flag_row_np)
        _run(proxy, _set_pending, None)
    except BaseException as exc:
        if target is not None:
            target.close()
        log.error("%s: flagging failed (%s: %s); restoring the previous flags from %r",
                  ms, type(exc).__name__, exc, name)
        try:
            _run(proxy, _restore_version, ms, name)
            _run(proxy, _set_pending, None)
            # the MS is as it was: a version saved by this failed run would only confuse
            _delete_version(ms, name)
        except BaseException as exc2:  # noqa: BLE001 - the first error is the one raised
            log.critical("%s: could not restore the previous flags (%s); they are kept in "
                         "flag version %r: run contimg.flagging.recover_flags(%r)",
                         ms, exc2, name, ms)
        raise
    finally:
        bits.remove()
    if not backup:
        _delete_version(ms, name)

    summary = summary_record(
        ms, ds, st.to_dict(),
        group=os.path.basename(ms)[:-3] if ms.endswith(".ms") else os.path.basename(ms),
        backup=({"name": name, "path": version_path, "format": "casa-flagversions"}
                if backup else None),
        before=summary_part(before), after=summary_part(after))
    timing["total"] = _time.perf_counter() - t_start
    summary["timing_s"] = {k: round(v, 4) for k, v in timing.items()}
    log.info("%s: flagged %.2f %% -> %.2f %% in %.1f s (backup %s)", ms,
             100 * summary["before"]["overall"], 100 * summary["after"]["overall"],
             timing["total"], name if backup else "none")
    if summary_path is not None:
        write_flag_summary(summary, summary_path)
    return summary


#: directory beside the MS (``<ms><suffix><host>-<pid>-<token>``) where :func:`flag_ms`
#: keeps each block's flags (one bit per visibility) until the array-wide decisions
BITS_SUFFIX = ".contimg-flagbits-"
_HOST = socket.gethostname()


class _BitFiles:
    """The flagger's store (``graphs.flag.flag_dataset(store=...)``): each block's
    packed flags in a file of a directory beside the MS, read back once the array-wide
    decisions are made, so that the flagger holds only the blocks in flight whatever
    the group's size (in memory they would take 1/8 byte per visibility of the group).
    Plain writes and reads (no memmap): the bytes sit in the page cache, not in this
    process. Directories left by a process that died are removed by the next one."""

    def __init__(self, ms):
        import threading

        self._clean_stale(ms)
        self.dir = f"{ms}{BITS_SUFFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.makedirs(self.dir)
        self._n = 0
        self._lock = threading.Lock()

    @staticmethod
    def _clean_stale(ms):
        """Remove this host's directories of ``ms`` whose process is gone. Another
        host's are never touched: its PIDs mean nothing here (the MS may be on a disk
        that several nodes share)."""
        parent, base = os.path.split(ms)
        for entry in os.listdir(parent or "."):
            if not entry.startswith(base + BITS_SUFFIX):
                continue
            host, _, rest = entry[len(base + BITS_SUFFIX):].rpartition("-")[0].rpartition("-")
            if host != _HOST:
                continue
            try:
                os.kill(int(rest), 0)
                continue                       # its process is running
            except ProcessLookupError:
                pass
            except (ValueError, PermissionError):
                continue
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)

    def __dask_tokenize__(self):
        return self.dir

    def put(self, bits):
        with self._lock:
            self._n += 1
            path = os.path.join(self.dir, f"{self._n:06d}.bits")
        with open(path, "wb") as fh:
            fh.write(np.ascontiguousarray(bits, dtype=np.uint8).data)
        return path

    def get(self, path):
        return np.fromfile(path, dtype=np.uint8)

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


#: largest baseline block read at once (VISIBILITY bytes): a block is all integrations
#: and channels of its baselines, so longer or wider groups get fewer baselines per block
#: (a full DSA-110 group: 256 baselines, ``[flag] baseline_block``). 32 MiB held ~0.1 GiB
#: less but cost ~10 % more CPU: the MS's tiles (1552 rows) are read whole, so smaller
#: blocks read each tile more often (README, "Memory as the group grows").
BLOCK_BYTES = 96 << 20


def _block_size(st, ds) -> int:
    plane = ds.sizes["time"] * ds.sizes["frequency"] * ds.sizes["polarization"] * 8
    return int(max(1, min(st.baseline_block, BLOCK_BYTES // max(plane, 1),
                          ds.sizes["baseline_id"])))


def _read_block(proxy, layout, column, conj, bsl, nchan):
    """VISIBILITY and FLAG of every integration and channel of the baselines ``bsl``,
    as :func:`contimg.io.ms.open_ms` gives them (read in the MS's table thread)."""
    from daskms.table_proxy import READLOCK

    vis, flag, _ = proxy.submit(get_cells, READLOCK, layout, column, conj, bsl,
                                slice(0, nchan), False).result()
    return vis, flag


def baseline_block_dataset(proxy, ds, layout, block, column="DATA", name="ms"):
    """``ds`` (of :func:`open_ms`) with VISIBILITY and FLAG read per baseline block
    (all integrations and channels of ``block`` baselines, one read of the MS each, in
    its table thread): the flagger's own blocks, so that no task needs the whole band
    of every baseline at once (open_ms's chunks are subbands of all baselines)."""
    import dask
    import dask.array as da
    import xarray as xr

    nt, nbl = ds.sizes["time"], ds.sizes["baseline_id"]
    nf, npol = ds.sizes["frequency"], ds.sizes["polarization"]
    conj = ds.attrs.get("ms_conjugation", "ms") == "ms"
    vis, flag = [], []
    for k, b0 in enumerate(range(0, nbl, block)):
        bsl = slice(b0, min(b0 + block, nbl))
        d = dask.delayed(_read_block, pure=True, nout=2)(
            proxy, layout, column, conj, bsl, nf,
            dask_key_name=f"flag-read-{k:04d}-{name}")
        shape = (nt, bsl.stop - bsl.start, nf, npol)
        vis.append(da.from_delayed(d[0], shape, dtype=np.complex64))
        flag.append(da.from_delayed(d[1], shape, dtype=bool))
    out = ds.copy()
    for name, parts in (("VISIBILITY", vis), ("FLAG", flag)):
        out[name] = xr.DataArray(da.concatenate(parts, axis=1), dims=ds[name].dims,
                                 coords=ds[name].coords, attrs=ds[name].attrs)
    return out


def _write_flag_row_hook(tb, layout, flag_row):
    return put_flag_row(tb, layout, flag_row)


def default_summary_path(path) -> Path:
    """Conventional place of a group's flag summary: ``<ms>.flag_summary.json``."""
    return Path(os.path.abspath(os.fspath(path)).rstrip("/") + ".flag_summary.json")
