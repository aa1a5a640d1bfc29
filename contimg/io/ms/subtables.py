"""The MS subtables :func:`write_ms` fills, one function per subtable, each declaring its
columns (what goes in them is described in :mod:`contimg.io.ms`)."""

from __future__ import annotations

import time as _time

import numpy as np

from contimg.io.ms.common import CORR_TYPE, MJD_UNIX_OFFSET_S, MS_TELESCOPE_NAMES

__all__ = ["write_subtables"]


def _receptors(pols):
    """Receptor labels and the CORR_PRODUCT (ncorr, 2) for polarization labels."""
    labels = [str(p) for p in pols]
    letters = sorted({c for p in labels if len(p) == 2 for c in p})
    if set(letters) <= {"X", "Y"} or not letters:
        receptors = ["X", "Y"]
    elif set(letters) <= {"R", "L"}:
        receptors = ["R", "L"]
    else:
        raise ValueError(f"cannot mix linear and circular polarizations: {labels}")
    product = []
    for p in labels:
        if len(p) == 2:
            product.append([receptors.index(p[0]), receptors.index(p[1])])
        else:  # Stokes parameters: nominal
            product.append([0, 0])
    return receptors, np.asarray(product, dtype=np.int32)


def _jname(ra, dec):
    """IAU-style J name of a direction (radians), e.g. ``J123456.78+543412.3``."""
    ra_h = np.degrees(np.mod(ra, 2 * np.pi)) / 15.0
    h = int(ra_h)
    m = int((ra_h - h) * 60)
    s = (ra_h - h - m / 60) * 3600
    sign = "+" if dec >= 0 else "-"
    d_deg = abs(np.degrees(dec))
    d = int(d_deg)
    dm = int((d_deg - d) * 60)
    ds_ = (d_deg - d - dm / 60) * 3600
    return f"J{h:02d}{m:02d}{s:05.2f}{sign}{d:02d}{dm:02d}{ds_:04.1f}"


def _set_direction_ref(tb, columns, ref="ICRS"):
    for col in columns:
        kw = tb.getcolkeywords(col)
        meas = dict(kw.get("MEASINFO", {"type": "direction"}))
        meas["Ref"] = ref
        tb.putcolkeyword(col, "MEASINFO", meas)


def _open(ms_path, name):
    from casacore import tables as ct

    return ct.table(f"{ms_path}/{name}", readonly=False, ack=False)


def _put_rows(tb, nrow, columns):
    """Add ``nrow`` rows and fill whole columns (``{name: values}``)."""
    tb.addrows(nrow)
    for name, values in columns.items():
        tb.putcol(name, values)


def _put_row(tb, cells):
    """Add one row and fill its cells (``{name: value}``)."""
    tb.addrows(1)
    for name, value in cells.items():
        tb.putcell(name, 0, value)


def _time_range(plan):
    """(start, end) MJD seconds of the observation."""
    return (plan.mjd[0] - plan.integration_time / 2,
            plan.mjd[-1] + plan.integration_time / 2)


def _write_antenna(ms_path, plan):
    """ANTENNA, with pyuvdata's extra column for the file's antenna numbers."""
    from casacore import tables as ct

    n = plan.nant
    with _open(ms_path, "ANTENNA") as tb:
        tb.addcols(ct.makescacoldesc("ANTENNA_NUMBER", 0, valuetype="int",
                                     comment="Antenna number used by the source file"))
        _put_rows(tb, n, {
            "NAME": plan.ant_name, "STATION": plan.ant_name, "TYPE": ["GROUND-BASED"] * n,
            "MOUNT": plan.ant_mount, "POSITION": plan.ant_pos, "OFFSET": np.zeros((n, 3)),
            "DISH_DIAMETER": plan.ant_diam, "FLAG_ROW": np.zeros(n, dtype=bool),
            "ANTENNA_NUMBER": plan.ant_number})


def _write_feed(ms_path, plan):
    """FEED: one per antenna, valid for all spectral windows."""
    n = plan.nant
    receptors, _ = _receptors(plan.pols)
    nrec = len(receptors)
    t_start, t_end = _time_range(plan)
    angles = [0.0, np.pi / 2] if receptors == ["X", "Y"] else [0.0, 0.0]
    with _open(ms_path, "FEED") as tb:
        _put_rows(tb, n, {
            "ANTENNA_ID": np.arange(n, dtype=np.int32),
            "FEED_ID": np.zeros(n, dtype=np.int32),
            "SPECTRAL_WINDOW_ID": np.full(n, -1, dtype=np.int32),
            "TIME": np.full(n, 0.5 * (t_start + t_end)),
            "INTERVAL": np.full(n, t_end - t_start),
            "NUM_RECEPTORS": np.full(n, nrec, dtype=np.int32),
            "BEAM_ID": np.full(n, -1, dtype=np.int32),
            "BEAM_OFFSET": np.zeros((n, nrec, 2)),
            "POLARIZATION_TYPE": np.array([receptors] * n),
            "POL_RESPONSE": np.tile(np.eye(nrec, dtype=np.complex64), (n, 1, 1)),
            "POSITION": np.zeros((n, 3)),
            "RECEPTOR_ANGLE": np.tile(np.asarray(angles), (n, 1))})


def _field_names(plan):
    """The phase centres' names (the Dataset's ``phase_center_name``), else J names of
    their positions made unique (a given name may repeat: one source, several
    phase centres)."""
    names = []
    for k, (r, d) in enumerate(zip(plan.ra[plan.field_first_time],
                                   plan.dec[plan.field_first_time], strict=True)):
        given = None if plan.pc_name is None else plan.pc_name[plan.field_first_time[k]]
        if given:
            names.append(str(given))
            continue
        name = _jname(r, d)
        while name in names:
            name += "_"
        names.append(name)
    return names


def _write_field_and_source(ms_path, plan):
    """FIELD and SOURCE: one row per distinct phase centre, ICRS."""
    from casacore import tables as ct

    n = plan.nfield
    names = _field_names(plan)
    dirs = np.stack([plan.ra[plan.field_first_time],
                     plan.dec[plan.field_first_time]], axis=1)[:, None, :]
    field_time = np.array([plan.mjd[plan.field_of_time == k].mean() for k in range(n)])
    with _open(ms_path, "FIELD") as tb:
        _put_rows(tb, n, {
            "NAME": names, "CODE": [""] * n, "TIME": field_time,
            "NUM_POLY": np.zeros(n, dtype=np.int32),
            "DELAY_DIR": dirs, "PHASE_DIR": dirs, "REFERENCE_DIR": dirs,
            "SOURCE_ID": np.arange(n, dtype=np.int32), "FLAG_ROW": np.zeros(n, dtype=bool)})
        _set_direction_ref(tb, ("DELAY_DIR", "PHASE_DIR", "REFERENCE_DIR"))

    t_start, t_end = _time_range(plan)
    source_desc = ct.required_ms_desc("SOURCE")
    with ct.default_ms_subtable("SOURCE", f"{ms_path}/SOURCE", source_desc,
                                ct.makedminfo(source_desc)) as tb:
        _put_rows(tb, n, {
            "SOURCE_ID": np.arange(n, dtype=np.int32),
            "TIME": np.full(n, 0.5 * (t_start + t_end)),
            "INTERVAL": np.full(n, t_end - t_start),
            "SPECTRAL_WINDOW_ID": np.full(n, -1, dtype=np.int32),
            "NUM_LINES": np.zeros(n, dtype=np.int32), "NAME": names,
            "CALIBRATION_GROUP": np.zeros(n, dtype=np.int32), "CODE": [""] * n,
            "DIRECTION": dirs[:, 0, :], "PROPER_MOTION": np.zeros((n, 2))})
        _set_direction_ref(tb, ("DIRECTION",))
    with ct.table(ms_path, readonly=False, ack=False) as tb:
        tb.putkeyword("SOURCE", f"Table: {ms_path}/SOURCE")


def _write_spectral_setup(ms_path, plan):
    """SPECTRAL_WINDOW (one, ascending), POLARIZATION and DATA_DESCRIPTION."""
    _, corr_product = _receptors(plan.pols)
    width = np.full(plan.nchan, plan.chan_width)
    with _open(ms_path, "SPECTRAL_WINDOW") as tb:
        _put_row(tb, {
            "CHAN_FREQ": plan.freq, "CHAN_WIDTH": width, "EFFECTIVE_BW": width,
            "RESOLUTION": width, "NUM_CHAN": plan.nchan,
            "REF_FREQUENCY": float(plan.freq[0]),
            "TOTAL_BANDWIDTH": float(plan.nchan * plan.chan_width),
            "MEAS_FREQ_REF": 5,  # TOPO
            "NAME": "SPW0", "NET_SIDEBAND": 1, "FREQ_GROUP": 0, "FREQ_GROUP_NAME": "",
            "IF_CONV_CHAIN": 0, "FLAG_ROW": False})
    with _open(ms_path, "POLARIZATION") as tb:
        _put_row(tb, {
            "NUM_CORR": plan.npol,
            "CORR_TYPE": np.array([CORR_TYPE[p] for p in plan.pols], dtype=np.int32),
            "CORR_PRODUCT": corr_product, "FLAG_ROW": False})
    with _open(ms_path, "DATA_DESCRIPTION") as tb:
        _put_row(tb, {"SPECTRAL_WINDOW_ID": 0, "POLARIZATION_ID": 0, "FLAG_ROW": False})


def _write_observation(ms_path, plan):
    """OBSERVATION, with pyuvdata's TELESCOPE_LOCATION column; STATE; PROCESSOR."""
    from casacore import tables as ct

    with _open(ms_path, "OBSERVATION") as tb:
        tb.addcols(ct.makearrcoldesc("TELESCOPE_LOCATION", 0.0, shape=[3],
                                     valuetype="double",
                                     comment="ITRF array centre, m (pyuvdata convention)"))
        _put_row(tb, {
            "TELESCOPE_NAME": MS_TELESCOPE_NAMES.get(plan.telescope_name,
                                                     plan.telescope_name),
            "TELESCOPE_LOCATION": plan.telescope_location,
            "TIME_RANGE": np.array(_time_range(plan)),
            "OBSERVER": "contimg", "PROJECT": "contimg", "RELEASE_DATE": 0.0,
            "SCHEDULE_TYPE": "", "LOG": np.array([""]), "SCHEDULE": np.array([""]),
            "FLAG_ROW": False})
    with _open(ms_path, "STATE") as tb:
        _put_row(tb, {"SIG": True, "REF": False, "CAL": 0.0, "LOAD": 0.0, "SUB_SCAN": 0,
                      "OBS_MODE": "OBSERVE_TARGET#ON_SOURCE", "FLAG_ROW": False})
    with _open(ms_path, "PROCESSOR") as tb:
        _put_row(tb, {"TYPE": "CORRELATOR", "SUB_TYPE": plan.telescope_name, "TYPE_ID": 0,
                      "MODE_ID": 0, "FLAG_ROW": False})


def _write_pointing(ms_path, plan):
    """POINTING: the dishes look at the phase centre of each integration (drift scan:
    fixed az/el, not tracking), one row per antenna and integration."""
    n = plan.nant * plan.ntime
    ptime = np.repeat(plan.mjd, plan.nant)
    pdir = np.repeat(np.stack([plan.ra, plan.dec], axis=1), plan.nant, axis=0)[:, None, :]
    with _open(ms_path, "POINTING") as tb:
        _put_rows(tb, n, {
            "ANTENNA_ID": np.tile(np.arange(plan.nant, dtype=np.int32), plan.ntime),
            "TIME": ptime, "TIME_ORIGIN": ptime,
            "INTERVAL": np.full(n, plan.integration_time), "NAME": [""] * n,
            "NUM_POLY": np.zeros(n, dtype=np.int32), "DIRECTION": pdir, "TARGET": pdir,
            "TRACKING": np.zeros(n, dtype=bool)})
        _set_direction_ref(tb, ("DIRECTION", "TARGET"))


def _write_history(ms_path, plan, history):
    """HISTORY: who wrote the MS, from which files, and the caller's messages."""
    from contimg import __version__

    messages = [f"written by contimg {__version__} (contimg.io.ms.write_ms)"]
    src = plan.ds.attrs.get("source_files")
    if src:
        src = [src] if isinstance(src, str) else list(src)
        messages.append("source files: " + ", ".join(str(s) for s in src))
    if history:
        messages.extend([history] if isinstance(history, str) else [str(h) for h in history])
    n = len(messages)
    with _open(ms_path, "HISTORY") as tb:
        _put_rows(tb, n, {
            "TIME": np.full(n, _time.time() + MJD_UNIX_OFFSET_S),
            "OBSERVATION_ID": np.zeros(n, dtype=np.int32), "MESSAGE": messages,
            "PRIORITY": ["NORMAL"] * n, "ORIGIN": ["contimg.io.ms.write_ms"] * n,
            "OBJECT_ID": np.zeros(n, dtype=np.int32), "APPLICATION": ["contimg"] * n})
        for i in range(n):
            tb.putcell("CLI_COMMAND", i, np.array([""]))
            tb.putcell("APP_PARAMS", i, np.array([""]))


def write_subtables(ms_path, plan, history=None):
    """Fill every subtable of the MS at ``ms_path`` (its MAIN table already written)."""
    _write_antenna(ms_path, plan)
    _write_feed(ms_path, plan)
    _write_field_and_source(ms_path, plan)
    _write_spectral_setup(ms_path, plan)
    _write_observation(ms_path, plan)
    _write_pointing(ms_path, plan)
    _write_history(ms_path, plan, history)
