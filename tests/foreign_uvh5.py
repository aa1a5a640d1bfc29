"""A small UVH5 file of another telescope, made with pyuvdata (no downloads): for the
tests of contimg convert / open_any on data contimg did not write."""

from __future__ import annotations

import warnings

import numpy as np

T0_JD = 2460954.0  # 2025-10-04 12:00 UTC


def foreign_uvdata(*, name="TESTARRAY", nant=5, ntime=3, nchan=16, pols=("rr", "ll"),
                   descending=False, int_time=8.0, seed=0, ra=1.2, dec=-0.6,
                   cat_name="MYSRC", lat=-30.7215, lon=21.4283, alt=1050.0):
    """A pyuvdata UVData of a made-up southern array: ``nant`` antennas within ~600 m,
    ``nchan`` 1 MHz channels near 1.3 GHz, random visibilities, phased (by pyuvdata)
    to a named sidereal ICRS centre."""
    from astropy import units as u
    from astropy.coordinates import EarthLocation
    from pyuvdata import Telescope, UVData
    from pyuvdata.utils import ECEF_from_ENU

    rng = np.random.default_rng(seed)
    loc = EarthLocation.from_geodetic(lon * u.deg, lat * u.deg, alt * u.m)
    enu = np.column_stack([rng.uniform(-300, 300, nant), rng.uniform(-300, 300, nant),
                           rng.uniform(-2, 2, nant)])
    ecef = ECEF_from_ENU(enu, center_loc=loc)
    xyz = np.array([loc.x.to_value(u.m), loc.y.to_value(u.m), loc.z.to_value(u.m)])
    numbers = np.arange(nant) * 2 + 3        # not 0..n-1: numbers are not indices
    telescope = Telescope.new(name=name, instrument=name, location=loc,
                              antenna_positions=ecef - xyz,
                              antenna_names=[f"ant{n:02d}" for n in numbers],
                              antenna_numbers=numbers, antenna_diameters=np.full(nant, 12.0),
                              mount_type="alt-az", feeds=["r", "l"] if pols[0][0] == "r"
                              else ["x", "y"], feed_angle=np.zeros((nant, 2)),
                              update_from_known=False)
    freq = 1.3e9 + np.arange(nchan) * 1e6
    if descending:
        freq = freq[::-1]
    times = T0_JD + np.arange(ntime) * int_time / 86400.0
    pairs = [(int(a), int(b)) for i, a in enumerate(numbers) for b in numbers[i + 1:]]
    nblt = ntime * len(pairs)
    shape = (nblt, nchan, len(pols))
    data = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uvd = UVData.new(freq_array=freq, polarization_array=list(pols), times=times,
                         telescope=telescope, antpairs=pairs, do_blt_outer=True,
                         integration_time=int_time, channel_width=1e6 * (-1 if descending else 1),
                         data_array=data, flag_array=np.zeros(shape, bool),
                         nsample_array=np.ones(shape, np.float32), history="made by a test")
        uvd.phase(ra=ra, dec=dec, epoch="J2000", cat_name=cat_name, phase_frame="icrs")
    return uvd


def write_foreign_uvh5(path, **kw):
    uvd = foreign_uvdata(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uvd.write_uvh5(str(path), clobber=True)
    return uvd
