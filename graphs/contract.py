"""The visibility Dataset contract: its names, a constructor, and a checker.

Every layer may use this module (``contimg`` readers and writers, ``graphs`` builders;
``kernels`` see only numpy arrays and need none of it). It holds the dimension and
variable names, their dtypes, the sign convention, :func:`visibility_dataset` (the one
way the readers build a Dataset) and :func:`check` / :func:`validate`, which say exactly
what is wrong with a Dataset.

Every stage of contimg takes and returns an :class:`xarray.Dataset` of this shape
(named after the MSv4 / xradio conventions so that the ecosystem feels at home):

Dimensions
    ``time``, ``baseline_id``, ``frequency``, ``polarization``, ``uvw_label`` (3),
    ``antenna_id`` (the antenna table), ``cartesian_pos_label`` (3).

Data variables
    ``VISIBILITY``  complex64  (time, baseline_id, frequency, polarization)
    ``FLAG``        bool       (time, baseline_id, frequency, polarization)
    ``WEIGHT``      float32    (time, baseline_id, frequency, polarization)
    ``UVW``         float64    (time, baseline_id, uvw_label), metres, ``uvw = x2 - x1``
                    projected towards that integration's phase centre, in the frame
                    named by the ``frame`` attribute (``"icrs"``: J2000/ICRS axes).
    ``PHASE_CENTER_RA``/``PHASE_CENTER_DEC`` float64 (time), radians, ICRS: the
                    phase centre of each integration (DSA-110: the meridian at that
                    integration's time).
    ``ANTENNA_POSITION`` float64 (antenna_id, cartesian_pos_label): ITRF/ECEF metres
                    (absolute, not relative to the array centre).
    ``ANTENNA_DISH_DIAMETER`` float64 (antenna_id), metres.

Coordinates
    ``time``                float64 seconds, UTC, unix epoch (attrs: units="s",
                            scale="utc", format="unix", integration_time=<s>)
    ``baseline_antenna1_id``/``baseline_antenna2_id`` int32 (baseline_id): indices
                            into the ``antenna_id`` dimension, antenna1 <= antenna2
    ``frequency``           float64 Hz, strictly ascending (attrs: units="Hz",
                            channel_width=<Hz>)
    ``polarization``        str, e.g. ["XX", "YY"]
    ``uvw_label``           ["u", "v", "w"]
    ``antenna_id``          int32 0..Nant-1
    ``antenna_name``        str (antenna_id)
    ``antenna_number``      int32 (antenna_id): the number the file used
    ``cartesian_pos_label`` ["x", "y", "z"]

Attributes
    ``telescope_name`` (str), ``telescope_location`` (ITRF x, y, z metres),
    ``phase_center_dec`` (radians, DSA-110 pointing declination, when known),
    ``source_files`` (list of str), ``visibility_convention``
    (:data:`VISIBILITY_CONVENTION`).

Chunking: one chunk per subband (48 channels for DSA-110) along ``frequency``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = [
    "TIME", "BASELINE", "FREQUENCY", "POLARIZATION", "UVW_LABEL", "ANTENNA", "XYZ",
    "VIS_DIMS", "UVW_DIMS", "VISIBILITY_CONVENTION", "REQUIRED_VARS", "VAR_ATTRS",
    "REQUIRED_COORDS",
    "REQUIRED_ATTRS", "KNOWN_POLS", "SchemaError", "visibility_dataset", "check",
    "validate",
]

# dimension names
TIME = "time"
BASELINE = "baseline_id"
FREQUENCY = "frequency"
POLARIZATION = "polarization"
UVW_LABEL = "uvw_label"
ANTENNA = "antenna_id"
XYZ = "cartesian_pos_label"

VIS_DIMS = (TIME, BASELINE, FREQUENCY, POLARIZATION)
UVW_DIMS = (TIME, BASELINE, UVW_LABEL)

#: The contract's sign convention (pyuvdata's; ``uvw = x2 - x1``).
VISIBILITY_CONVENTION = "V = sum S exp(+2 pi i (u l + v m + w (n - 1)) / lambda)"

# name -> (dims, dtype)
REQUIRED_VARS = {
    "VISIBILITY": (VIS_DIMS, np.dtype("complex64")),
    "FLAG": (VIS_DIMS, np.dtype("bool")),
    "WEIGHT": (VIS_DIMS, np.dtype("float32")),
    "UVW": (UVW_DIMS, np.dtype("float64")),
    "PHASE_CENTER_RA": ((TIME,), np.dtype("float64")),
    "PHASE_CENTER_DEC": ((TIME,), np.dtype("float64")),
    "ANTENNA_POSITION": ((ANTENNA, XYZ), np.dtype("float64")),
    "ANTENNA_DISH_DIAMETER": ((ANTENNA,), np.dtype("float64")),
}

#: attributes the constructor gives each data variable
VAR_ATTRS = {
    "UVW": {"units": "m", "frame": "icrs", "convention": "x2 - x1"},
    "PHASE_CENTER_RA": {"units": "rad", "frame": "icrs"},
    "PHASE_CENTER_DEC": {"units": "rad", "frame": "icrs"},
    "ANTENNA_POSITION": {"units": "m", "frame": "ITRF"},
    "ANTENNA_DISH_DIAMETER": {"units": "m"},
}

REQUIRED_COORDS = {
    "time": (TIME,),
    "baseline_antenna1_id": (BASELINE,),
    "baseline_antenna2_id": (BASELINE,),
    "frequency": (FREQUENCY,),
    "polarization": (POLARIZATION,),
    "uvw_label": (UVW_LABEL,),
    "antenna_name": (ANTENNA,),
    "antenna_number": (ANTENNA,),
}

REQUIRED_ATTRS = ("telescope_name", "telescope_location")

KNOWN_POLS = {"XX", "YY", "XY", "YX", "RR", "LL", "RL", "LR", "I", "Q", "U", "V"}


class SchemaError(ValueError):
    """Raised when a Dataset does not follow the visibility contract.

    ``problems`` holds one sentence per violation.
    """

    def __init__(self, problems, name="dataset"):
        self.problems = list(problems)
        msg = f"{name} does not follow the visibility contract:\n  - " + "\n  - ".join(
            self.problems
        )
        super().__init__(msg)


def visibility_dataset(*, vis, flag, weight, uvw, time, integration_time, antenna1, antenna2,
                       frequency, channel_width, polarizations, phase_center_ra,
                       phase_center_dec, antenna_position, antenna_dish_diameter,
                       antenna_name, antenna_number, telescope_name, telescope_location,
                       attrs=None, name="dataset"):
    """Build a contract Dataset from its parts and :func:`validate` it.

    The big arrays (``vis``, ``flag``, ``weight``: ``(time, baseline, frequency,
    polarization)``; ``uvw``: ``(time, baseline, 3)``) are taken as they are, numpy or
    dask, already in the contract's dtypes and chunks (nothing is cast or computed);
    the small ones are made the contract's dtypes. ``time``: unix seconds (UTC) of the
    integration centres; ``antenna1``/``antenna2``: indices into the antenna table;
    ``frequency``: ascending Hz; ``phase_center_*``: ICRS radians per integration;
    ``antenna_position``: absolute ITRF metres. ``attrs`` (e.g. ``source_files``,
    ``phase_center_dec``) follow ``telescope_name`` and ``telescope_location``;
    ``visibility_convention`` defaults to :data:`VISIBILITY_CONVENTION`. ``name``
    names the source in the :class:`SchemaError` of a nonconforming result.
    """
    antenna_position = np.asarray(antenna_position, dtype=np.float64)
    nant = antenna_position.shape[0]
    nbl = np.shape(antenna1)[0]
    all_attrs = dict.fromkeys(("telescope_name", "telescope_location"))
    all_attrs.update(attrs or {})
    all_attrs.update(telescope_name=str(telescope_name),
                     telescope_location=[float(x) for x in np.ravel(telescope_location)])
    all_attrs.setdefault("visibility_convention", VISIBILITY_CONVENTION)
    small = {
        "PHASE_CENTER_RA": np.asarray(phase_center_ra, dtype=np.float64),
        "PHASE_CENTER_DEC": np.asarray(phase_center_dec, dtype=np.float64),
        "ANTENNA_POSITION": antenna_position,
        "ANTENNA_DISH_DIAMETER": np.asarray(antenna_dish_diameter, dtype=np.float64),
    }
    arrays = {"VISIBILITY": vis, "FLAG": flag, "WEIGHT": weight, "UVW": uvw, **small}
    data_vars = {var: (dims, arrays[var], dict(VAR_ATTRS.get(var, {})))
                 for var, (dims, _) in REQUIRED_VARS.items()}
    ds = xr.Dataset(
        data_vars=data_vars,
        coords={
            "time": (TIME, np.asarray(time, dtype=np.float64),
                     {"units": "s", "scale": "utc", "format": "unix",
                      "integration_time": float(integration_time)}),
            "baseline_id": (BASELINE, np.arange(nbl, dtype=np.int32)),
            "baseline_antenna1_id": (BASELINE, np.asarray(antenna1, dtype=np.int32)),
            "baseline_antenna2_id": (BASELINE, np.asarray(antenna2, dtype=np.int32)),
            "frequency": (FREQUENCY, np.asarray(frequency, dtype=np.float64),
                          {"units": "Hz", "channel_width": float(channel_width)}),
            "polarization": (POLARIZATION, np.asarray([str(p) for p in polarizations])),
            "uvw_label": (UVW_LABEL, np.asarray(["u", "v", "w"])),
            "antenna_id": (ANTENNA, np.arange(nant, dtype=np.int32)),
            "antenna_name": (ANTENNA, np.asarray([str(n) for n in antenna_name])),
            "antenna_number": (ANTENNA, np.asarray(antenna_number, dtype=np.int32)),
            "cartesian_pos_label": (XYZ, np.asarray(["x", "y", "z"])),
        },
        attrs=all_attrs,
    )
    return validate(ds, name=name)


def check(ds, *, check_values=True):
    """Return the list of contract violations of ``ds`` (empty when it conforms).

    ``check_values`` also inspects coordinate values (ascending frequency, antenna
    indices in range, finite times); it never computes the big data variables.
    """
    problems = []
    for name, (dims, dtype) in REQUIRED_VARS.items():
        if name not in ds.data_vars:
            problems.append(f"missing data variable {name!r} {dims}")
            continue
        var = ds[name]
        if tuple(var.dims) != dims:
            problems.append(f"{name} has dims {tuple(var.dims)}, expected {dims}")
        if var.dtype != dtype:
            problems.append(f"{name} has dtype {var.dtype}, expected {dtype}")
    for name, dims in REQUIRED_COORDS.items():
        if name not in ds.coords:
            problems.append(f"missing coordinate {name!r} {dims}")
        elif tuple(ds[name].dims) != dims:
            problems.append(
                f"coordinate {name} has dims {tuple(ds[name].dims)}, expected {dims}"
            )
    for name in REQUIRED_ATTRS:
        if name not in ds.attrs:
            problems.append(f"missing attribute {name!r}")
    if "uvw_label" in ds.coords and list(ds["uvw_label"].values) != ["u", "v", "w"]:
        problems.append(f"uvw_label must be ['u', 'v', 'w'], got {list(ds['uvw_label'].values)}")
    if "telescope_location" in ds.attrs:
        loc = np.asarray(ds.attrs["telescope_location"], dtype=float)
        if loc.shape != (3,) or not np.all(np.isfinite(loc)):
            problems.append("attribute telescope_location must be 3 finite ITRF metres")

    if check_values and not problems:
        problems.extend(_check_values(ds))
    return problems


def _check_values(ds):
    problems = []
    freq = np.asarray(ds["frequency"].values)
    if freq.size and not np.all(np.isfinite(freq)):
        problems.append("frequency has non-finite values")
    elif freq.size > 1 and not np.all(np.diff(freq) > 0):
        problems.append("frequency must be strictly ascending")
    if "channel_width" not in ds["frequency"].attrs:
        problems.append("frequency coordinate lacks the 'channel_width' attribute")
    t = np.asarray(ds["time"].values)
    if t.dtype.kind != "f":
        problems.append(f"time must be float64 unix seconds, got dtype {t.dtype}")
    elif not np.all(np.isfinite(t)):
        problems.append("time has non-finite values")
    elif t.size > 1 and not np.all(np.diff(t) > 0):
        problems.append("time must be strictly ascending")
    nant = ds.sizes.get("antenna_id", 0)
    a1 = np.asarray(ds["baseline_antenna1_id"].values)
    a2 = np.asarray(ds["baseline_antenna2_id"].values)
    if a1.size:
        if a1.min() < 0 or a2.min() < 0 or a1.max() >= nant or a2.max() >= nant:
            problems.append(
                f"baseline antenna ids must index the antenna table (0..{nant - 1})"
            )
        if np.any(a1 > a2):
            problems.append("baseline_antenna1_id must be <= baseline_antenna2_id")
        key = a1.astype(np.int64) * (nant + 1) + a2
        if np.unique(key).size != key.size:
            problems.append("baselines are not unique")
    pols = [str(p) for p in ds["polarization"].values]
    bad = [p for p in pols if p not in KNOWN_POLS]
    if bad:
        problems.append(f"unknown polarization labels {bad}")
    if len(set(pols)) != len(pols):
        problems.append(f"duplicate polarization labels {pols}")
    return problems


def validate(ds, *, name="dataset", check_values=True):
    """Raise :class:`SchemaError` listing every violation; return ``ds`` otherwise."""
    problems = check(ds, check_values=check_values)
    if problems:
        raise SchemaError(problems, name=name)
    return ds
