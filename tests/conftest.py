"""Shared fixtures: small simulated DSA-110 groups, made once per session."""

from __future__ import annotations

import os

import numpy as np
import pytest

from contimg.runtime import configure
from contimg.simulate import SimConfig, simulate_group
# the shared foreign-MS fixtures (casa_sim_ms, casa_sim_ms_4pol, pyuvdata_ms)
from foreign import casa_sim_ms, casa_sim_ms_4pol, pyuvdata_ms  # noqa: E402,F401

# the process settings the CLI, the stream and the workers apply (HDF5 file locking
# off, astropy offline, dask's worker malloc setting)
configure()

SMALL = dict(n_ant=10, n_subbands=4, n_chan=8, n_times=6)


@pytest.fixture(scope="session")
def small_cfg():
    return SimConfig(**SMALL)


@pytest.fixture(scope="session")
def small_group(tmp_path_factory, small_cfg):
    """A shrunken group: 10 antennas, 4 subbands x 8 channels, 6 integrations, RFI on."""
    out = tmp_path_factory.mktemp("small_group")
    return simulate_group(out, cfg=small_cfg, calibrator=True)


@pytest.fixture(scope="session")
def clean_group(tmp_path_factory):
    """Noise-free, gain-free, RFI-free group with one known source off the phase centre."""
    import datetime as dt

    from contimg.simulate import _metadata

    cfg = SimConfig(n_ant=12, n_subbands=2, n_chan=8, n_times=4, noise=False, gains=False,
                    rfi=None)
    start = dt.datetime(2026, 1, 15, 8, 0, 0)
    meta = _metadata(cfg, start)
    ra0, dec0 = meta["ra_icrs"][2], meta["dec_icrs"][2]
    sky = dict(ra=np.array([ra0 + np.radians(1.0)]), dec=np.array([dec0 + np.radians(0.7)]),
               flux=np.array([5.0]), alpha=np.array([-0.7]), name=np.array(["S"]),
               ref_freq=np.array([1.4e9]))
    out = tmp_path_factory.mktemp("clean_group")
    g = simulate_group(out, start, cfg=cfg, sky=sky)
    return g, cfg, sky


@pytest.fixture(scope="session")
def full_group(tmp_path_factory):
    """A full-size DSA-110 group (16 x 48 channels, 96 antennas, 24 integrations)."""
    out = tmp_path_factory.mktemp("full_group")
    return simulate_group(out, cfg=SimConfig(), calibrator=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CONTIMG_REQUIRE_INTEROP=1) a missing external tool is a failure, not a skip."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("CONTIMG_REQUIRE_INTEROP") == "1":
        reason = str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if "not installed" in reason or "not found" in reason:
            rep.outcome = "failed"
            rep.longrepr = f"CONTIMG_REQUIRE_INTEROP=1 but the test was skipped: {reason}"


def casa_site_config(tmp_path):
    """A CASA site config that keeps CASA offline (casadata's measures, no updates)."""
    import casadata

    site = tmp_path / "casasiteconfig.py"
    site.write_text(
        f"measurespath = {casadata.datapath!r}\n"
        "measures_auto_update = False\ndata_auto_update = False\n"
        "datapath = [measurespath]\nskipnetworkcheck = True\n"
        f"cachedir = {str(tmp_path)!r}\nlogfile = {str(tmp_path / 'casa.log')!r}\n")
    return site


@pytest.fixture(scope="session")
def app_data(tmp_path_factory):
    """The operator app's test database and products (tests/app_data.py), built once."""
    from app_data import build

    return build(tmp_path_factory.mktemp("appdata"))
