"""CASA calibration tables (``NewCalTable`` format) written and read with python-casacore.

The layout mirrors, column for column, what CASA 6.7's ``bandpass`` and ``gaincal``
write (checked against tables CASA wrote for one of our MSs):

main table  ``table.info`` type ``Calibration``, subType ``B Jones`` / ``G Jones``;
            keywords ``ParType = 'Complex'``, ``MSName``, ``VisCal``, ``PolBasis =
            'unknown'``, ``CASA_Version``, and the subtables ``OBSERVATION``,
            ``ANTENNA``, ``FIELD``, ``SPECTRAL_WINDOW``, ``HISTORY``; columns ``TIME``
            (MJD seconds, UTC measure), ``FIELD_ID``, ``SPECTRAL_WINDOW_ID``,
            ``ANTENNA1``, ``ANTENNA2`` (the reference antenna), ``INTERVAL``,
            ``SCAN_NUMBER``, ``OBSERVATION_ID``, ``CPARAM`` (nchan, npol) complex,
            ``PARAMERR``, ``FLAG``, ``SNR``, ``WEIGHT`` (left empty, as CASA does), all
            in one StandardStMan. One row per antenna of the MS ANTENNA table and
            solution time: B tables have one time (the data's mean time) and all
            channels; G tables one row per antenna and solution interval, one channel.
subtables   copies of the MS's ANTENNA, FIELD, OBSERVATION; SPECTRAL_WINDOW is the
            MS's for a B table and one channel of the whole band for a G table (as
            CASA writes it); HISTORY has the MS's columns and no rows.

Convention: CASA's ``V_pq = J_p M_pq J_q^H`` holds for the MS's ``DATA``; our
Datasets hold ``conj(DATA)`` (see :mod:`contimg.io.ms`), so the gains of a Dataset
solution are the complex conjugates of CASA's. :func:`write_caltable` and
:func:`read_caltable` conjugate; everything above this module sees Dataset
convention.

Tables are written to ``<path>.tmp-<pid>`` and renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np

from contimg.io.files import finalise
from kernels.constants import MJD_UNIX_OFFSET_S

log = logging.getLogger(__name__)

CASA_VERSION = "6.7.0-31"

__all__ = ["write_caltable", "read_caltable", "read_solutions", "write_solutions",
           "CalTableError"]


class CalTableError(ValueError):
    """A calibration table is missing, malformed or does not match the data."""


def _main_desc():
    from casacore import tables as ct

    def sca(name, value, **kw):
        return ct.makescacoldesc(name, value, datamanagertype="StandardStMan",
                                 datamanagergroup="MSMTAB", **kw)

    def arr(name, value, valuetype):
        return ct.makearrcoldesc(name, value, valuetype=valuetype,
                                 datamanagertype="StandardStMan", datamanagergroup="MSMTAB")

    cols = [
        sca("TIME", 0.0, keywords={"MEASINFO": {"Ref": "UTC", "type": "epoch"},
                                   "QuantumUnits": ["s"]}),
        sca("FIELD_ID", 0),
        sca("SPECTRAL_WINDOW_ID", 0),
        sca("ANTENNA1", 0),
        sca("ANTENNA2", 0),
        sca("INTERVAL", 0.0, keywords={"QuantumUnits": ["s"]}),
        sca("SCAN_NUMBER", 0),
        sca("OBSERVATION_ID", 0),
        arr("CPARAM", 0j, "complex"),
        arr("PARAMERR", 0.0, "float"),
        arr("FLAG", False, "boolean"),
        arr("SNR", 0.0, "float"),
        arr("WEIGHT", 0.0, "float"),
    ]
    return ct.maketabdesc(cols)


def _copy_subtable(ms_path, name, dest, keep_rows=True):
    from casacore import tables as ct

    src = os.path.join(ms_path, name)
    with ct.table(src, ack=False) as t:
        # an explicit read lock: when dask-ms in this process has the table open (with
        # user locking), casacore hands out that same table, and reads need the lock
        t.lock(write=False)
        try:
            if keep_rows:
                t.copy(dest, deep=True, valuecopy=True)
                return
            desc, dminfo = t.getdesc(), t.getdminfo()
        finally:
            t.unlock()
    # an empty table with the same columns (removing rows from a copy leaves an index
    # CASA's casacore cannot read)
    ct.table(dest, desc, dminfo=dminfo, nrow=0, ack=False).close()


def write_caltable(path, ms_path, *, kind, times_unix, cparam, flag, paramerr=None, snr=None,
                   refant=0, field_id=None, interval=None, scan_number=1, overwrite=True,
                   convention="dataset", freqs_hz=None):
    """Write a CASA ``B Jones`` or ``G Jones`` table for the MS at ``ms_path``.

    Parameters
    ----------
    path : str
        Output table directory.
    ms_path : str
        The Measurement Set the solutions belong to (its ANTENNA, FIELD,
        SPECTRAL_WINDOW and OBSERVATION subtables are copied).
    kind : {"B", "G"}
        Bandpass (one solution time, every channel) or gains (one channel).
    times_unix : array (nsol,)
        Solution times (unix seconds; written as MJD seconds).
    cparam : array (nsol, nant, nchan, npol)
        Solutions for every antenna of the MS ANTENNA table (``nchan`` = 1 for G).
    flag, paramerr, snr : arrays like ``cparam`` (bool, float, float)
    refant : int
        Written to ``ANTENNA2`` (as CASA does).
    field_id : array (nsol,), optional
        FIELD_ID of each solution (default 0).
    interval : array (nsol,), optional
        INTERVAL column (CASA writes 0).
    convention : {"dataset", "casa"}
        ``"dataset"`` (default) conjugates ``cparam`` into CASA's convention.
    freqs_hz : array (nchan,), optional
        Frequency of each channel of a B ``cparam``. Default: ascending (a Dataset's
        order) for ``convention="dataset"``, the MS's channel order for ``"casa"``.
        The table's channels follow the MS's SPECTRAL_WINDOW (CASA maps CPARAM
        channel j to CHAN_FREQ[j]), so solutions of a descending-frequency MS are
        written in its (descending) order.
    """
    from casacore import tables as ct

    kind = kind.upper()
    if kind not in ("B", "G"):
        raise ValueError(f"kind must be 'B' or 'G', got {kind!r}")
    ms_path = os.path.abspath(os.fspath(ms_path))
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(os.path.join(ms_path, "table.dat")):
        raise CalTableError(f"{ms_path}: not a Measurement Set (no table.dat)")
    cparam = np.asarray(cparam)
    if cparam.ndim != 4:
        raise ValueError(f"cparam must be (nsol, nant, nchan, npol), got {cparam.shape}")
    nsol, nant, nchan, npol = cparam.shape
    with ct.table(os.path.join(ms_path, "ANTENNA"), ack=False) as t:
        n_ms_ant = t.nrows()
    if nant != n_ms_ant:
        raise CalTableError(f"{ms_path}: ANTENNA has {n_ms_ant} rows, solutions have {nant}")
    with ct.table(os.path.join(ms_path, "SPECTRAL_WINDOW"), ack=False) as t:
        ms_freq = t.getcell("CHAN_FREQ", 0)
        ms_width = t.getcell("CHAN_WIDTH", 0)
    if kind == "B" and nchan != ms_freq.size:
        raise CalTableError(f"{ms_path}: {ms_freq.size} channels, bandpass has {nchan}")
    chan = None   # B: the cparam channel of each MS channel
    if kind == "B":
        if freqs_hz is None and convention == "dataset":
            freqs_hz = np.sort(ms_freq)
        if freqs_hz is not None:
            chan = _channel_map(np.asarray(freqs_hz, float).reshape(-1), ms_freq, ms_width,
                                ms_path)
    if kind == "G" and nchan != 1:
        raise ValueError(f"G solutions must have one channel, got {nchan}")
    flag = np.broadcast_to(np.asarray(flag, bool), cparam.shape)
    paramerr = (np.zeros(cparam.shape, np.float32) if paramerr is None
                else np.broadcast_to(np.asarray(paramerr, np.float32), cparam.shape))
    snr = (np.zeros(cparam.shape, np.float32) if snr is None
           else np.broadcast_to(np.asarray(snr, np.float32), cparam.shape))
    if chan is not None and not np.array_equal(chan, np.arange(nchan)):
        cparam, flag, paramerr, snr = (a[:, :, chan] for a in (cparam, flag, paramerr, snr))
    if convention == "dataset":
        cparam = np.conj(cparam)
    elif convention != "casa":
        raise ValueError(f"convention must be 'dataset' or 'casa', got {convention!r}")
    times = np.asarray(times_unix, float).reshape(nsol)
    field_id = np.zeros(nsol, np.int32) if field_id is None else np.asarray(field_id, np.int32)
    interval = np.zeros(nsol) if interval is None else np.asarray(interval, float)

    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path}: already exists")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        nrow = nsol * nant
        with ct.table(tmp, _main_desc(), nrow=nrow, ack=False) as tb:
            tb.putinfo({"type": "Calibration", "subType": f"{kind} Jones", "readme": ""})
            tb.putkeyword("ParType", "Complex")
            tb.putkeyword("MSName", os.path.basename(ms_path))
            tb.putkeyword("VisCal", f"{kind} Jones")
            tb.putkeyword("PolBasis", "unknown")
            tb.putkeyword("CASA_Version", CASA_VERSION)
            tb.putcol("TIME", np.repeat(times + MJD_UNIX_OFFSET_S, nant))
            tb.putcol("FIELD_ID", np.repeat(field_id, nant))
            tb.putcol("SPECTRAL_WINDOW_ID", np.zeros(nrow, np.int32))
            tb.putcol("ANTENNA1", np.tile(np.arange(nant, dtype=np.int32), nsol))
            tb.putcol("ANTENNA2", np.full(nrow, int(refant), np.int32))
            tb.putcol("INTERVAL", np.repeat(interval, nant))
            tb.putcol("SCAN_NUMBER", np.full(nrow, int(scan_number), np.int32))
            tb.putcol("OBSERVATION_ID", np.zeros(nrow, np.int32))
            tb.putcol("CPARAM", cparam.reshape(nrow, nchan, npol).astype(np.complex64))
            tb.putcol("PARAMERR", paramerr.reshape(nrow, nchan, npol).astype(np.float32))
            tb.putcol("FLAG", flag.reshape(nrow, nchan, npol))
            tb.putcol("SNR", snr.reshape(nrow, nchan, npol).astype(np.float32))
        for name in ("OBSERVATION", "ANTENNA", "FIELD", "SPECTRAL_WINDOW", "HISTORY"):
            _copy_subtable(ms_path, name, os.path.join(tmp, name), keep_rows=name != "HISTORY")
        if kind == "G":
            with ct.table(os.path.join(tmp, "SPECTRAL_WINDOW"), readonly=False,
                          ack=False) as t:
                bw = float(np.sum(np.abs(ms_width)))
                for col, val in (("CHAN_FREQ", [float(np.mean(ms_freq))]),
                                 ("CHAN_WIDTH", [bw]), ("EFFECTIVE_BW", [bw]),
                                 ("RESOLUTION", [bw])):
                    t.putcell(col, 0, np.asarray(val))
                t.putcell("NUM_CHAN", 0, 1)
        # subtable keywords: table references (stored relative to the parent)
        with ct.table(tmp, readonly=False, ack=False) as tb:
            for name in ("OBSERVATION", "ANTENNA", "FIELD", "SPECTRAL_WINDOW", "HISTORY"):
                with ct.table(os.path.join(tmp, name), ack=False) as sub:
                    tb.putkeyword(name, sub)
        if os.path.lexists(path):
            shutil.rmtree(path)
        os.rename(finalise(tmp), path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s Jones table %s: %d solution time(s) x %d antennas x %d channel(s)",
             kind, path, nsol, nant, nchan)
    return path


def _channel_map(freqs, ms_freq, ms_width, ms_path):
    """For each MS channel, the index of ``freqs`` at its frequency (refused, naming the
    MS, unless every MS channel has exactly one within a tenth of a channel)."""
    if freqs.size != ms_freq.size:
        raise CalTableError(f"{ms_path}: {ms_freq.size} channels, bandpass has {freqs.size}")
    order = np.argsort(freqs, kind="stable")
    pos = np.clip(np.searchsorted(freqs[order], ms_freq), 0, freqs.size - 1)
    best = order[pos]
    lower = order[np.maximum(pos - 1, 0)]
    best = np.where(np.abs(freqs[lower] - ms_freq) < np.abs(freqs[best] - ms_freq), lower, best)
    tol = 0.1 * np.maximum(np.abs(np.asarray(ms_width, float)), 1e-3)
    if (np.abs(freqs[best] - ms_freq) > tol).any() or np.unique(best).size != best.size:
        raise CalTableError(f"{ms_path}: the bandpass channels' frequencies do not match "
                            "the MS SPECTRAL_WINDOW's channels")
    return best


def read_caltable(path, convention="dataset"):
    """Read a CASA ``B Jones`` or ``G Jones`` table (ours or CASA's).

    Returns a dict: ``kind`` ("B"/"G"), ``times_unix`` (nsol,), ``cparam`` (nsol, nant,
    nchan, npol) in the requested convention (Dataset: conjugated), ``flag``,
    ``snr``, ``paramerr``, ``refant``, ``freqs_hz`` (nchan,), ``ms_name``,
    ``antenna_names``, ``field_id`` (nsol,). Rows missing for an antenna at a time
    come back flagged with unit gain. A single SPECTRAL_WINDOW is supported.
    Channels: ascending frequency for ``convention="dataset"`` (as a Dataset's), the
    table's own order (its SPECTRAL_WINDOW's, e.g. descending) for ``"casa"``;
    ``cparam[..., j, :]`` is always the solution at ``freqs_hz[j]``.
    """
    from casacore import tables as ct

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "table.dat")):
        raise CalTableError(f"{path}: not a casacore table (no table.dat)")
    with ct.table(path, ack=False) as tb:
        info = tb.info()
        kw = tb.getkeywords()
        viscal = str(kw.get("VisCal", info.get("subType", "")))
        if info.get("type") != "Calibration" or kw.get("ParType") != "Complex":
            raise CalTableError(f"{path}: not a complex calibration table "
                                f"(type {info.get('type')!r}, ParType {kw.get('ParType')!r})")
        kind = viscal.split()[0].upper() if viscal else ""
        if kind not in ("B", "G", "T"):
            raise CalTableError(f"{path}: VisCal {viscal!r} not supported (B, G or T Jones)")
        if tb.nrows() == 0:
            raise CalTableError(f"{path}: table has no rows")
        spw = tb.getcol("SPECTRAL_WINDOW_ID")
        if np.unique(spw).size > 1:
            raise CalTableError(f"{path}: {np.unique(spw).size} spectral windows; one supported")
        time = tb.getcol("TIME")
        a1 = tb.getcol("ANTENNA1")
        a2 = tb.getcol("ANTENNA2")
        cp = tb.getcol("CPARAM")
        fl = tb.getcol("FLAG")
        snr = tb.getcol("SNR") if "SNR" in tb.colnames() else np.zeros(cp.shape, np.float32)
        err = tb.getcol("PARAMERR") if "PARAMERR" in tb.colnames() else np.zeros(cp.shape)
        fid = tb.getcol("FIELD_ID")
    with ct.table(os.path.join(path, "ANTENNA"), ack=False) as t:
        names = list(t.getcol("NAME"))
    with ct.table(os.path.join(path, "SPECTRAL_WINDOW"), ack=False) as t:
        freqs = t.getcell("CHAN_FREQ", int(spw[0]))
    nant = len(names)
    ut, tidx = np.unique(time, return_inverse=True)
    nsol, nchan, npol = ut.size, cp.shape[1], cp.shape[2]
    if kind == "T" and npol == 1:
        cp = np.repeat(cp, 2, axis=2)
        fl = np.repeat(fl, 2, axis=2)
        snr = np.repeat(snr, 2, axis=2)
        err = np.repeat(err, 2, axis=2)
        npol = 2
    cparam = np.ones((nsol, nant, nchan, npol), np.complex64)
    flag = np.ones((nsol, nant, nchan, npol), bool)
    s = np.zeros((nsol, nant, nchan, npol), np.float32)
    e = np.zeros((nsol, nant, nchan, npol), np.float32)
    cparam[tidx, a1] = cp
    flag[tidx, a1] = fl
    s[tidx, a1] = snr
    e[tidx, a1] = err
    field = np.zeros(nsol, np.int32)
    field[tidx] = fid
    freqs = np.asarray(freqs, float)
    if convention == "dataset":
        cparam = np.conj(cparam)
        if freqs.size == nchan and freqs.size > 1 and not np.all(np.diff(freqs) > 0):
            o = np.argsort(freqs, kind="stable")
            freqs = freqs[o]
            cparam, flag, s, e = (a[:, :, o] for a in (cparam, flag, s, e))
    ref = np.unique(a2)
    return dict(kind="G" if kind == "T" else kind, times_unix=ut - MJD_UNIX_OFFSET_S,
                cparam=cparam, flag=flag, snr=s, paramerr=e,
                refant=int(ref[0]) if ref.size == 1 else int(np.bincount(a2).argmax()),
                freqs_hz=freqs, ms_name=str(kw.get("MSName", "")),
                antenna_names=names, field_id=field, path=path)


def read_solutions(tables, polarization=("XX", "YY")):
    """Read B and/or G tables into the solutions mapping :func:`graphs.calibrate.apply`
    takes (Dataset convention). ``tables`` is a path or a list of paths: at most one
    B and one G table (``T Jones`` tables count as G)."""
    if isinstance(tables, (str, os.PathLike)):
        tables = [tables]
    out = {}
    for p in tables:
        t = read_caltable(p)
        if t["kind"] == "B":
            if "BANDPASS" in out:
                raise CalTableError(f"{p}: a second bandpass table (one B and one G allowed)")
            if t["cparam"].shape[0] != 1:
                # several bandpass solution times: take the one nearest the middle
                k = t["cparam"].shape[0] // 2
                log.warning("%s: %d bandpass solution times; using #%d", p,
                            t["cparam"].shape[0], k)
            else:
                k = 0
            out["BANDPASS"] = t["cparam"][k]
            out["BANDPASS_FLAG"] = t["flag"][k]
            out["frequency"] = t["freqs_hz"]
            out["bandpass_table"] = p
        else:
            if "GAIN" in out:
                raise CalTableError(f"{p}: a second gain table (one B and one G allowed)")
            out["GAIN"] = t["cparam"][:, :, 0, :]
            out["GAIN_FLAG"] = t["flag"][:, :, 0, :]
            out["gain_time"] = t["times_unix"]
            out["gain_table"] = p
        if t["cparam"].shape[-1] != len(polarization):
            raise CalTableError(f"{p}: {t['cparam'].shape[-1]} correlations, data have "
                                f"{len(polarization)}")
    return out


def write_solutions(solutions, ms_path, prefix, *, field_ids=None):
    """Write a computed solutions Dataset (:func:`graphs.calibrate.solve`) as
    ``<prefix>.B`` and ``<prefix>.G``; returns ``{"B": path, "G": path}``.

    ``field_ids``: FIELD_ID per gain solution (default: the MS field whose TIME
    matches, else 0).
    """
    refant = int(solutions.REFANT.values)
    b_time = float(np.mean(solutions.gain_time.values))
    B = solutions.BANDPASS.values[None]             # (1, nant, nchan, npol)
    pB = write_caltable(f"{prefix}.B", ms_path, kind="B", times_unix=[b_time], cparam=B,
                        flag=solutions.BANDPASS_FLAG.values[None],
                        paramerr=solutions.BANDPASS_ERR.values[None],
                        snr=solutions.BANDPASS_SNR.values[None], refant=refant,
                        field_id=[0] if field_ids is None else [field_ids[0]],
                        freqs_hz=(solutions.BANDPASS.frequency.values
                                  if "frequency" in solutions.BANDPASS.coords else None))
    G = solutions.GAIN.values[:, :, None, :]
    nsol = G.shape[0]
    if field_ids is None:
        field_ids = np.arange(nsol) if _fields_per_integration(ms_path, nsol) else np.zeros(nsol)
    pG = write_caltable(f"{prefix}.G", ms_path, kind="G",
                        times_unix=solutions.gain_time.values, cparam=G,
                        flag=solutions.GAIN_FLAG.values[:, :, None, :],
                        paramerr=solutions.GAIN_ERR.values[:, :, None, :],
                        snr=solutions.GAIN_SNR.values[:, :, None, :], refant=refant,
                        field_id=np.asarray(field_ids)[:nsol])
    return {"B": pB, "G": pG}


def _fields_per_integration(ms_path, nsol):
    from casacore import tables as ct

    with ct.table(os.path.join(ms_path, "FIELD"), ack=False) as t:
        return t.nrows() == nsol
