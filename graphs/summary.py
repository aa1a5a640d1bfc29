"""Lazy per-group summary statistics over a visibility Dataset (no compute here)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from graphs.flag import flag_summary


def group_summary(ds: xr.Dataset) -> xr.Dataset:
    """Flagged fraction and mean cross-correlation amplitude per channel and integration.

    The flagged fractions are :func:`graphs.flag.flag_summary`'s (the one flag-summary
    builder; it also has them per antenna and baseline). Returns a small lazy Dataset;
    ``.compute()`` it (on any scheduler) to evaluate. Reductions run chunk by chunk, so
    memory follows the chunk, not the group.
    """
    fs = flag_summary(ds)
    cross = ds.baseline_antenna1_id != ds.baseline_antenna2_id
    amp = np.abs(ds.VISIBILITY).where(~ds.FLAG & cross)
    return xr.Dataset(
        dict(
            flag_fraction_per_channel=fs.flag_fraction_channel,
            flag_fraction_per_time=fs.flag_fraction_time,
            flag_fraction_per_antenna=fs.flag_fraction_antenna,
            mean_cross_amplitude_per_channel=amp.mean(("time", "baseline_id", "polarization")),
            n_visibilities=xr.DataArray(ds.VISIBILITY.size),
            flag_fraction=fs.flag_fraction,
        )
    )
