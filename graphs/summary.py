"""Lazy per-group summary statistics over a visibility Dataset (no compute here)."""

from __future__ import annotations

import numpy as np
import xarray as xr


def group_summary(ds: xr.Dataset) -> xr.Dataset:
    """Flagged fraction and mean cross-correlation amplitude per channel and integration.

    Returns a small lazy Dataset; ``.compute()`` it (on any scheduler) to evaluate.
    Reductions run chunk by chunk, so memory follows the chunk, not the group.
    """
    cross = ds.baseline_antenna1_id != ds.baseline_antenna2_id
    flag = ds.FLAG
    amp = np.abs(ds.VISIBILITY).where(~flag & cross)
    out = xr.Dataset(
        dict(
            flag_fraction_per_channel=flag.mean(("time", "baseline_id", "polarization")),
            flag_fraction_per_time=flag.mean(("baseline_id", "frequency", "polarization")),
            mean_cross_amplitude_per_channel=amp.mean(("time", "baseline_id", "polarization")),
            n_visibilities=xr.DataArray(ds.VISIBILITY.size),
            flag_fraction=flag.mean(),
        )
    )
    return out
