import datetime as dt

import numpy as np
import pytest

from contimg import telescope as tel


def test_band_matches_the_dsa110_facts():
    sb0 = tel.subband_frequencies(0)
    sb15 = tel.subband_frequencies(15)
    assert sb0[0] == tel.TOP_CHANNEL_HZ == 1498643188.4765625
    assert np.all(np.diff(sb0) == -tel.CHANNEL_WIDTH_HZ)            # descending inside a file
    assert sb15[-1] == pytest.approx(1311.4e6, abs=0.1e6)           # ~1311.4 MHz at the bottom
    assert sb0[-1] - tel.CHANNEL_WIDTH_HZ == pytest.approx(tel.subband_frequencies(1)[0])


def test_shrunken_subbands_keep_their_band_edges():
    f8 = tel.subband_frequencies(3, 8)
    f48 = tel.subband_frequencies(3)
    w8 = tel.subband_channel_width(8)
    assert w8 == 6 * tel.CHANNEL_WIDTH_HZ
    assert f8[0] + w8 / 2 == pytest.approx(f48[0] + tel.CHANNEL_WIDTH_HZ / 2)
    assert f8[-1] - w8 / 2 == pytest.approx(f48[-1] - tel.CHANNEL_WIDTH_HZ / 2)


def test_subband_names_round_trip_and_bad_names_are_named():
    name = tel.subband_filename(dt.datetime(2026, 3, 1, 12, 5, 9), 7)
    assert name == "2026-03-01T12:05:09_sb07.hdf5"
    parsed = tel.parse_subband_filename("/some/dir/" + name)
    assert parsed.subband == 7 and parsed.stamp == "2026-03-01T12:05:09"
    for bad in ("2026-03-01T12:05:09_sb7.hdf5", "2026-03-01_sb07.hdf5",
                "2026-03-01T12:05:09_sb16.hdf5", "2026-13-01T12:05:09_sb01.hdf5",
                "2026-03-01T12:05:09_sb01.h5"):
        with pytest.raises(ValueError, match="sb|name|timestamp|range"):
            tel.parse_subband_filename(bad)


def test_t_layout_shape():
    enu, names = tel.t_layout_enu()
    assert enu.shape == (117, 3) and len(set(names)) == 117
    ew, ns, out = enu[:51], enu[51:102], enu[102:]
    assert np.ptp(ew[:, 0]) == pytest.approx(400, abs=2) and np.ptp(ew[:, 1]) < 3
    assert np.ptp(ns[:, 1]) == pytest.approx(440 - 440 / 51, abs=2) and np.ptp(ns[:, 0]) < 3
    r = np.hypot(out[:, 0], out[:, 1])
    assert r.max() == pytest.approx(2000, abs=5) and r.min() > 500


def test_correlated_subset_gives_4656_baselines():
    sel = tel.correlated_subset(96)
    assert sel.size == 96 and np.unique(sel).size == 96
    assert sel.size * (sel.size + 1) // 2 == 4656
    assert np.any(sel >= 102)  # some outriggers are correlated


def test_airy_beam_fwhm_is_about_3_degrees_at_1p4_ghz():
    theta = np.radians(np.linspace(0, 3, 30001))
    b = tel.airy_beam(theta, 1.4e9)
    half = np.degrees(theta[np.argmin(np.abs(b - 0.5))])
    # FWHM = 2 * half ~ 1.03 lambda / D = 3.0 deg for 4.65 m at 1.4 GHz
    assert 2 * half == pytest.approx(np.degrees(1.029 * 0.2141 / 4.65), rel=0.01)
    assert 2 * half == pytest.approx(2.7, abs=0.35)
