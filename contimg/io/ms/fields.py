"""FIELD rows of a Measurement Set and the selection of one field by id or name.

:func:`ms_fields` lists the fields (id, name, ICRS phase centre); :func:`resolve_field`
turns what a user typed (``3``, ``"3"``, ``"3C286"``) into the FIELD ids whose rows
:func:`~contimg.io.ms.read.open_ms` reads, or raises :class:`UnknownFieldError` naming
the MS and listing its fields.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from contimg.io.ms.common import UnknownFieldError, read_subtable
from contimg.io.ms.measures import direction_to_icrs

__all__ = ["ms_fields", "resolve_field", "read_fields", "FieldTable"]

log = logging.getLogger(__name__)


@dataclass
class FieldTable:
    """FIELD: names and ICRS phase centres (constant term), one entry per row."""

    name: list
    ra: np.ndarray    # radians, ICRS
    dec: np.ndarray

    @property
    def nfield(self):
        return len(self.name)

    def as_dicts(self):
        return [dict(id=i, name=self.name[i], ra=float(self.ra[i]), dec=float(self.dec[i]))
                for i in range(self.nfield)]

    def describe(self, limit=20):
        """``0 'name' (ra, dec deg), ...`` for messages; at most ``limit`` entries."""
        parts = [f"{i} {self.name[i]!r} ({np.degrees(self.ra[i]):.4f}, "
                 f"{np.degrees(self.dec[i]):+.4f} deg)" for i in range(min(self.nfield, limit))]
        if self.nfield > limit:
            parts.append(f"... ({self.nfield} fields in all)")
        return ", ".join(parts)


def read_fields(path):
    """The FIELD subtable of ``path`` as a :class:`FieldTable` (ICRS radians)."""
    field, fkw = read_subtable(path, "FIELD", ["PHASE_DIR", "NAME"],
                               optional=["PhaseDir_Ref"])
    phase_dir = np.asarray(field["PHASE_DIR"], dtype=np.float64)
    if phase_dir.ndim == 3 and phase_dir.shape[1] > 1:
        log.warning("%s: FIELD.PHASE_DIR has polynomial terms; using the constant term", path)
    phase_dir = phase_dir.reshape(phase_dir.shape[0], -1, 2)[:, 0, :]
    measinfo = fkw.get("PHASE_DIR", {}).get("MEASINFO", {})
    var_col = measinfo.get("VarRefCol")
    codes = None
    if var_col:
        if var_col != "PhaseDir_Ref":
            codes = read_subtable(path, "FIELD", [var_col])[0][var_col]
        else:
            codes = field.get(var_col)
    ra, dec = direction_to_icrs(phase_dir[:, 0], phase_dir[:, 1], measinfo, path,
                                "FIELD.PHASE_DIR", ref_codes=codes)
    return FieldTable(name=[str(n) for n in field["NAME"]], ra=np.asarray(ra, dtype=float),
                      dec=np.asarray(dec, dtype=float))


def ms_fields(path):
    """The fields of the MS at ``path``: ``[dict(id=, name=, ra=, dec=), ...]`` in FIELD
    order, phase centres in ICRS radians (J2000 and other frames converted)."""
    import os

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(os.path.join(path, "table.dat")):
        raise FileNotFoundError(f"{path}: not a casacore table (no table.dat)")
    return read_fields(path).as_dicts()


def resolve_field(path, field, fields, used_ids=None):
    """FIELD ids selected by ``field``: an int id, or a name (every FIELD row of that
    name); a string of digits is the id when no field has that name.

    ``used_ids``: the FIELD_IDs MAIN's rows use; a selection without rows is refused
    too. Raises :class:`UnknownFieldError` (a ``ValueError``) naming the MS and listing
    its fields.
    """
    ids = None
    if isinstance(field, (bool, np.bool_)):
        ids = None
    elif isinstance(field, (int, np.integer)):
        ids = [int(field)] if 0 <= int(field) < fields.nfield else None
    elif isinstance(field, str):
        named = [i for i, n in enumerate(fields.name) if n == field]
        if named:
            ids = named
        elif field.strip().isdigit() and int(field) < fields.nfield:
            ids = [int(field)]
    else:
        raise TypeError(f"field must be an int id or a name, not {type(field).__name__}")
    if ids is None:
        raise UnknownFieldError(f"{path}: no field {field!r}; the MS has "
                                f"{fields.nfield} field(s): {fields.describe()}")
    if used_ids is not None:
        ids = [i for i in ids if i in set(np.asarray(used_ids).tolist())]
        if not ids:
            raise UnknownFieldError(f"{path}: field {field!r} has no rows in the MAIN "
                                    f"table; fields: {fields.describe()}")
    return np.asarray(ids, dtype=np.int64)
