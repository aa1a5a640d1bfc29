"""Flagging an existing Measurement Set in place (issue 4: ``contimg.flagging.flag_ms``).

A small simulated DSA-110 group (10 antennas, 4 subbands x 8 channels, 6 integrations,
injected RFI) is written as an MS once per module; each test flags its own copy.
Checked: accuracy against the simulator's truth (MS rows, channels and antenna
numbers mapped to the truth mask), the MS path giving exactly the pipeline's flags,
the CASA flag-versions backup and an exact restore, failures and a killed process
leaving the previous flags intact, any row order / conjugation / channel order,
the summary against brute-force numpy counts, clear errors. Interop: CASA's
flagmanager lists and restores our backups, AOFlagger 3.1 runs on our flagged MS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from contimg import flagging as cf
from contimg.flagging import (
    PENDING_KEYWORD,
    flag_ms,
    list_flag_versions,
    recover_flags,
    restore_flags,
)
from contimg.io.ms import MSFormatError, write_ms
from contimg.simulate import RFIConfig, SimConfig, load_truth, simulate_group

AOFLAGGER = shutil.which("aoflagger")

#: The simulator places its RFI events per group whatever the band: 3 lines, 2 bursts
#: over >= 1/4 of the band and 2 bad channels cover ~5 % of a full 768-channel group's
#: time-frequency plane but 37 % of a 32-channel one. One event of each kind keeps the
#: small group's plane at a full group's scale (10-16 % RFI here; a full group is
#: checked in the slow test with the simulator's defaults).
SMALL_RFI = RFIConfig(n_lines=1, n_bursts=1, n_bad_channels=1, n_bad_antennas=1)
SMALL = dict(n_ant=10, n_subbands=4, n_chan=8, n_times=6, rfi=SMALL_RFI, seed=1)


# ---------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------

def read_main(path):
    """FLAG (nrow, nchan, ncorr), FLAG_ROW, TIME, ANTENNA1, ANTENNA2 of an MS."""
    from casacore import tables as ct

    with ct.table(str(path), ack=False) as tb:
        return {c: tb.getcol(c) for c in ("FLAG", "FLAG_ROW", "TIME", "ANTENNA1",
                                          "ANTENNA2")}


def ms_meta(path):
    from casacore import tables as ct

    with ct.table(os.path.join(str(path), "ANTENNA"), ack=False) as t:
        names = list(t.getcol("NAME"))
        numbers = t.getcol("ANTENNA_NUMBER")
    with ct.table(os.path.join(str(path), "SPECTRAL_WINDOW"), ack=False) as t:
        freq = t.getcell("CHAN_FREQ", 0)
    return names, numbers, freq


def truth_for_ms(path, truth):
    """The simulator's truth per MS sample (nrow, nchan, ncorr).

    Rows -> integration by TIME, antennas -> antenna numbers (ANTENNA_NUMBER) ->
    ``bad_antennas``; MS channels -> ``freqs_hz`` of the truth (ascending).
    """
    m = read_main(path)
    _, numbers, freq = ms_meta(path)
    t_index = np.unique(m["TIME"], return_inverse=True)[1].ravel()
    c_index = np.searchsorted(truth["freqs_hz"], freq)
    np.testing.assert_allclose(truth["freqs_hz"][c_index], freq, rtol=0, atol=1.0)
    bad = np.isin(numbers, truth["bad_antennas"])
    bad_row = bad[m["ANTENNA1"]] | bad[m["ANTENNA2"]]
    tf = truth["rfi_tf_mask"][t_index][:, c_index] | bad_row[:, None]
    return np.broadcast_to(tf[:, :, None], m["FLAG"].shape), bad_row


def scores(flags, truth):
    tp = np.sum(flags & truth)
    fp = np.sum(flags & ~truth)
    fn = np.sum(~flags & truth)
    p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return dict(precision=p, recall=r, f1=2 * p * r / max(p + r, 1e-300),
                clean_flagged=fp / max(np.sum(~truth), 1))


def copy_ms(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def preflag(path, seed=5):
    """Set some flags (5 % random, one channel of one baseline, one FLAG_ROW row)."""
    from casacore import tables as ct

    rng = np.random.default_rng(seed)
    with ct.table(str(path), readonly=False, ack=False) as tb:
        f = tb.getcol("FLAG")
        f |= rng.random(f.shape) < 0.05
        f[3::55, 7, :] = True
        tb.putcol("FLAG", f)
        fr = tb.getcol("FLAG_ROW")
        fr[17] = True
        tb.putcol("FLAG_ROW", fr)


# ---------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """The simulated group, its truth and its MS (written once)."""
    from contimg.io.uvh5 import open_group

    out = tmp_path_factory.mktemp("flag_ms_group")
    g = simulate_group(out / "uvh5", cfg=SimConfig(**SMALL), calibrator=True)
    ds = open_group(g.files, n_subbands=SMALL["n_subbands"])
    ms = str(out / f"{g.stamp}.ms")
    write_ms(ds, ms)
    return dict(group=g, truth=load_truth(g.truth), ms=ms, ds=ds)


@pytest.fixture
def ms(group, tmp_path):
    return copy_ms(group["ms"], tmp_path / "group.ms")


# ---------------------------------------------------------------------------------
# accuracy, and the MS path == the pipeline path
# ---------------------------------------------------------------------------------

def test_flag_ms_finds_the_injected_rfi(group, ms):
    t0 = time.perf_counter()
    summary = flag_ms(ms)
    elapsed = time.perf_counter() - t0
    m = read_main(ms)
    truth, bad_row = truth_for_ms(ms, group["truth"])
    sc = scores(m["FLAG"], truth)
    print(f"\nflag_ms on a {SMALL['n_ant']}-antenna, {SMALL['n_subbands']}x{SMALL['n_chan']}-"
          f"channel, {SMALL['n_times']}-integration MS: precision {sc['precision']:.4f} "
          f"recall {sc['recall']:.4f} F1 {sc['f1']:.4f} clean flagged "
          f"{sc['clean_flagged']:.3%} (truth {truth.mean():.1%}) in {elapsed:.2f} s")
    assert sc["precision"] >= 0.95
    assert sc["recall"] >= 0.95
    assert sc["clean_flagged"] <= 0.01
    # the bad antenna is flagged everywhere and reported so
    assert np.all(m["FLAG"][bad_row])
    names, numbers, _ = ms_meta(ms)
    for num in group["truth"]["bad_antennas"]:
        assert summary["after"]["antenna"][names[int(np.nonzero(numbers == num)[0][0])]] == 1.0
    # FLAG_ROW: exactly the rows whose every sample is flagged
    np.testing.assert_array_equal(m["FLAG_ROW"], m["FLAG"].all(axis=(1, 2)))


def test_ms_path_gives_the_pipeline_flags_exactly(group, ms):
    """flag_ms(MS) == flag_arrays on the UVH5 group (the way the pipeline flags)."""
    from graphs.flag import flag_arrays

    ds = group["ds"].compute()
    want = flag_arrays(ds.VISIBILITY.values, ds.FLAG.values, ds.baseline_antenna1_id.values,
                       ds.baseline_antenna2_id.values, ds.sizes["antenna_id"])
    flag_ms(ms, chunks={"time": 2, "frequency": 8})  # 12 read/write blocks
    got = read_main(ms)["FLAG"].reshape(want.shape)  # rows: time-major, Dataset order
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------
# backup and restore
# ---------------------------------------------------------------------------------

def test_backup_in_casa_layout_and_exact_restore(ms):
    from casacore import tables as ct

    preflag(ms)
    orig = read_main(ms)
    summary = flag_ms(ms)
    after = read_main(ms)
    assert after["FLAG"].sum() > orig["FLAG"].sum()
    assert np.all(after["FLAG"][orig["FLAG"]])                      # old flags kept
    assert np.all(after["FLAG"][orig["FLAG_ROW"]])                   # FLAG_ROW honoured

    vdir = ms + ".flagversions"
    assert summary["backup"] == {"name": "contimg_flag_1", "format": "casa-flagversions",
                                 "path": os.path.join(vdir, "flags.contimg_flag_1")}
    lines = open(os.path.join(vdir, "FLAG_VERSION_LIST")).read().splitlines()
    assert len(lines) == 1 and lines[0].startswith("contimg_flag_1 : flags before contimg")
    with ct.table(summary["backup"]["path"], ack=False) as ft:
        assert sorted(ft.colnames()) == ["FLAG", "FLAG_ROW"]
        assert ft.nrows() == orig["FLAG"].shape[0]
        dm = {d["NAME"]: d for d in ft.getdminfo().values()}
        assert dm["TiledFlag"]["TYPE"] == "TiledShapeStMan"
        assert dm["TiledFlag"]["COLUMNS"] == ["FLAG"]
        np.testing.assert_array_equal(ft.getcol("FLAG"), orig["FLAG"])
        np.testing.assert_array_equal(ft.getcol("FLAG_ROW"), orig["FLAG_ROW"])

    restore_flags(ms, "contimg_flag_1")
    back = read_main(ms)
    np.testing.assert_array_equal(back["FLAG"], orig["FLAG"])
    np.testing.assert_array_equal(back["FLAG_ROW"], orig["FLAG_ROW"])

    # flag again: the next free name; an existing name is refused before any change
    s2 = flag_ms(ms)
    assert s2["backup"]["name"] == "contimg_flag_2"
    flagged = read_main(ms)["FLAG"]
    np.testing.assert_array_equal(flagged, after["FLAG"])           # deterministic
    with pytest.raises(FileExistsError, match="contimg_flag_1"):
        flag_ms(ms, backup_name="contimg_flag_1")
    np.testing.assert_array_equal(read_main(ms)["FLAG"], flagged)
    assert [v["name"] for v in list_flag_versions(ms)] == ["contimg_flag_1", "contimg_flag_2"]
    restore_flags(ms, "contimg_flag_2", delete=True)
    np.testing.assert_array_equal(read_main(ms)["FLAG"], orig["FLAG"])
    assert [v["name"] for v in list_flag_versions(ms)] == ["contimg_flag_1"]


def test_no_backup_leaves_no_version(ms):
    flag_ms(ms, backup=False, backup_name=None)
    assert list_flag_versions(ms) == []
    assert read_main(ms)["FLAG"].any()


# ---------------------------------------------------------------------------------
# failures never leave half-written flags
# ---------------------------------------------------------------------------------

def _failing_writer(monkeypatch, fail_at, exc=RuntimeError):
    calls = []
    real = cf._put_flag_block

    def put(tb, *args):
        calls.append(1)
        if len(calls) == fail_at:
            raise exc("injected failure while writing FLAG")
        return real(tb, *args)

    monkeypatch.setattr(cf, "_put_flag_block", put)
    return calls


@pytest.mark.parametrize("backup", [True, False])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_write_restores_the_previous_flags(ms, monkeypatch, backup, exc):
    from casacore import tables as ct

    preflag(ms)
    orig = read_main(ms)
    calls = _failing_writer(monkeypatch, fail_at=4, exc=exc)
    with pytest.raises(exc, match="injected failure"):
        flag_ms(ms, backup=backup, chunks={"time": 2, "frequency": 8})  # 12 blocks
    assert len(calls) >= 4      # three blocks were written before the failure
    back = read_main(ms)
    np.testing.assert_array_equal(back["FLAG"], orig["FLAG"])
    np.testing.assert_array_equal(back["FLAG_ROW"], orig["FLAG_ROW"])
    assert list_flag_versions(ms) == []       # nothing left from the failed run
    with ct.table(ms, ack=False) as tb:
        assert PENDING_KEYWORD not in tb.getkeywords()
    monkeypatch.undo()
    flag_ms(ms)                               # and the MS flags fine afterwards
    assert read_main(ms)["FLAG"].sum() > orig["FLAG"].sum()


def test_failure_in_the_flagger_changes_nothing(ms, monkeypatch):
    import graphs.flag as gf

    preflag(ms)
    orig = read_main(ms)

    def broken(*a, **k):
        raise FloatingPointError("injected failure in the flagger")

    monkeypatch.setattr(gf, "_flag_block", broken)
    with pytest.raises(FloatingPointError, match="injected failure"):
        flag_ms(ms, chunks={"time": 2, "frequency": 8})
    back = read_main(ms)
    np.testing.assert_array_equal(back["FLAG"], orig["FLAG"])
    np.testing.assert_array_equal(back["FLAG_ROW"], orig["FLAG_ROW"])
    assert list_flag_versions(ms) == []


def test_a_killed_run_is_recovered(group, ms, tmp_path, monkeypatch):
    """A process that dies mid-write (simulated: the write fails *and* the restore
    cannot run) leaves the pending marker; the next flag_ms restores first."""
    from casacore import tables as ct

    preflag(ms)
    orig = read_main(ms)
    ref = copy_ms(ms, tmp_path / "ref.ms")
    flag_ms(ref, backup=False)
    want = read_main(ref)

    _failing_writer(monkeypatch, fail_at=6)

    def dead(*a, **k):
        raise SystemError("process killed")

    monkeypatch.setattr(cf, "_restore_version", dead)
    with pytest.raises(RuntimeError, match="injected failure"):
        flag_ms(ms, backup=False, chunks={"time": 2, "frequency": 8})
    half = read_main(ms)
    assert not np.array_equal(half["FLAG"], orig["FLAG"])           # half-written
    with ct.table(ms, ack=False) as tb:
        pending = tb.getkeyword(PENDING_KEYWORD)
    assert pending.startswith("contimg_tmp_")
    assert [v["name"] for v in list_flag_versions(ms)] == [pending]
    monkeypatch.undo()

    recovered = copy_ms(ms, tmp_path / "recovered.ms")
    shutil.copytree(ms + ".flagversions", recovered + ".flagversions")
    assert recover_flags(recovered) == pending
    np.testing.assert_array_equal(read_main(recovered)["FLAG"], orig["FLAG"])
    np.testing.assert_array_equal(read_main(recovered)["FLAG_ROW"], orig["FLAG_ROW"])
    assert list_flag_versions(recovered) == []
    assert recover_flags(recovered) is None

    flag_ms(ms, backup=False)                 # restores the pending version, then flags
    got = read_main(ms)
    np.testing.assert_array_equal(got["FLAG"], want["FLAG"])
    np.testing.assert_array_equal(got["FLAG_ROW"], want["FLAG_ROW"])
    assert list_flag_versions(ms) == []


# ---------------------------------------------------------------------------------
# any row order, conjugation and channel order
# ---------------------------------------------------------------------------------

def _scrambled_copy(src, dst, channels="reversed"):
    """``src`` with rows reordered, one row stored as (ant2, ant1), and channels
    descending (``"reversed"``) or in a random order (``"shuffled"``)."""
    from casacore import tables as ct

    with ct.table(src, ack=False) as tb:
        srt = tb.sort("ANTENNA2 DESC, TIME DESC, ANTENNA1")
        srt.copy(dst, deep=True, valuecopy=True)
        srt.close()
    with ct.table(dst, readonly=False, ack=False) as tb:
        a1, a2 = tb.getcol("ANTENNA1"), tb.getcol("ANTENNA2")
        row = int(np.nonzero(a1 < a2)[0][5])
        tb.putcell("ANTENNA1", row, a2[row])
        tb.putcell("ANTENNA2", row, a1[row])
        tb.putcell("DATA", row, np.conj(tb.getcell("DATA", row)))
        tb.putcell("UVW", row, -tb.getcell("UVW", row))
        nchan = tb.getcell("FLAG", 0).shape[0]
        order = (np.arange(nchan)[::-1] if channels == "reversed"
                 else np.random.default_rng(2).permutation(nchan))
        for col in ("DATA", "FLAG", "WEIGHT_SPECTRUM"):
            tb.putcol(col, np.ascontiguousarray(tb.getcol(col)[:, order]))
    with ct.table(os.path.join(dst, "SPECTRAL_WINDOW"), readonly=False, ack=False) as t:
        t.putcell("CHAN_FREQ", 0, t.getcell("CHAN_FREQ", 0)[order])
    return dst


def _flags_by_key(path):
    """{(TIME, lo antenna, hi antenna): FLAG cell with channels ascending}."""
    m = read_main(path)
    _, _, freq = ms_meta(path)
    order = np.argsort(freq)
    return {(t, min(a, b), max(a, b)): f[order] for t, a, b, f in
            zip(m["TIME"], m["ANTENNA1"], m["ANTENNA2"], m["FLAG"], strict=True)}


@pytest.mark.parametrize("channels", ["reversed", "shuffled"])
def test_any_row_order_conjugation_and_channel_order(ms, tmp_path, channels):
    preflag(ms)
    scr = _scrambled_copy(ms, str(tmp_path / "scrambled.ms"), channels)
    m = read_main(scr)
    assert np.any(np.diff(m["TIME"]) < 0) and np.any(m["ANTENNA1"] > m["ANTENNA2"])
    step = np.diff(ms_meta(scr)[2])
    assert np.all(step < 0) if channels == "reversed" else (step < 0).any() and (step > 0).any()
    flag_ms(ms)
    # 8-channel blocks: descending MS channel ranges / scattered MS channels
    flag_ms(scr, chunks={"time": 4, "frequency": 8})
    want, got = _flags_by_key(ms), _flags_by_key(scr)
    assert want.keys() == got.keys()
    for key, cell in want.items():
        np.testing.assert_array_equal(got[key], cell)
    m = read_main(scr)
    np.testing.assert_array_equal(m["FLAG_ROW"], m["FLAG"].all(axis=(1, 2)))
    restore_flags(scr, "contimg_flag_1")


# ---------------------------------------------------------------------------------
# the summary
# ---------------------------------------------------------------------------------

def _brute_force(path, flag, flag_row=None):
    m = read_main(path)
    names, _, _ = ms_meta(path)
    f = flag if flag_row is None else flag | flag_row[:, None, None]
    t_index = np.unique(m["TIME"], return_inverse=True)[1].ravel()
    ant = {}
    for a in np.unique(np.concatenate([m["ANTENNA1"], m["ANTENNA2"]])):
        rows = (m["ANTENNA1"] == a) | (m["ANTENNA2"] == a)
        ant[names[a]] = f[rows].mean()
    return dict(overall=f.mean(), antenna=ant, channel=f.mean(axis=(0, 2)),
                integration=np.array([f[t_index == t].mean()
                                      for t in range(t_index.max() + 1)]))


def _assert_summary(part, brute):
    assert part["overall"] == pytest.approx(brute["overall"], abs=1e-12)
    assert part["antenna"].keys() == brute["antenna"].keys()
    for name, frac in brute["antenna"].items():
        assert part["antenna"][name] == pytest.approx(frac, abs=1e-12), name
    np.testing.assert_allclose(part["channel"], brute["channel"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(part["integration"], brute["integration"], rtol=0, atol=1e-12)


def test_summary_equals_a_brute_force_count(ms, tmp_path):
    preflag(ms)
    orig = read_main(ms)
    progress = []
    out = tmp_path / "summary.json"
    summary = flag_ms(ms, summary_path=out, chunks={"time": 3, "frequency": 16},
                      progress=lambda done, total: progress.append((done, total)))
    after = read_main(ms)
    _assert_summary(summary["before"], _brute_force(ms, orig["FLAG"], orig["FLAG_ROW"]))
    _assert_summary(summary["after"], _brute_force(ms, after["FLAG"]))
    assert summary["newly_flagged"] == pytest.approx(
        after["FLAG"].mean() - (orig["FLAG"] | orig["FLAG_ROW"][:, None, None]).mean())
    assert summary["shape"] == {"time": 6, "baseline_id": 55, "frequency": 32,
                                "polarization": 2}
    _, _, freq = ms_meta(ms)
    np.testing.assert_array_equal(summary["frequency_hz"], np.sort(freq))
    assert len(summary["time_unix"]) == 6
    assert len(summary["after"]["antenna"]) == SMALL["n_ant"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    # 2 time x 2 frequency blocks, each reported once
    assert sorted(progress) == [(k, 4) for k in range(1, 5)]
    assert summary["timing_s"]["total"] > 0


# ---------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------

def test_clear_errors_name_the_file(ms, tmp_path):
    from casacore import tables as ct

    with pytest.raises(FileNotFoundError, match=r"nothing\.ms: no such Measurement Set"):
        flag_ms(tmp_path / "nothing.ms")
    (tmp_path / "empty.ms").mkdir()
    with pytest.raises(MSFormatError, match=r"empty\.ms: not a Measurement Set"):
        flag_ms(tmp_path / "empty.ms")
    (tmp_path / "file.ms").write_text("not a table")
    with pytest.raises(MSFormatError, match=r"file\.ms: not a Measurement Set"):
        flag_ms(tmp_path / "file.ms")
    plain = str(tmp_path / "plain.tab")
    with ct.table(plain, ct.maketabdesc([ct.makescacoldesc("X", 0)]), nrow=2, ack=False):
        pass
    with pytest.raises(MSFormatError, match=r"plain\.tab: not a Measurement Set"):
        flag_ms(plain)

    noflag = copy_ms(ms, tmp_path / "noflag.ms")
    with ct.table(noflag, readonly=False, ack=False) as tb:
        tb.removecols("FLAG")
    with pytest.raises(MSFormatError, match=r"noflag\.ms: no FLAG column"):
        flag_ms(noflag)
    assert not os.path.exists(noflag + ".flagversions")

    with pytest.raises(KeyError, match=r"no flag version 'nope'"):
        restore_flags(ms, "nope")
    with pytest.raises(ValueError, match="invalid flag version name"):
        flag_ms(ms, backup_name="a/b")
    with pytest.raises(ValueError, match="unknown FlagStrategy keys"):
        flag_ms(ms, strategy={"no_such_option": 1})
    assert not read_main(ms)["FLAG"].any() and list_flag_versions(ms) == []


# ---------------------------------------------------------------------------------
# a full band (slow)
# ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_flag_ms_on_a_full_band_group(tmp_path):
    """16 antennas x 768 channels x 24 integrations, the simulator's default RFI."""
    from contimg.io.uvh5 import open_group

    g = simulate_group(tmp_path / "uvh5", cfg=SimConfig(n_ant=16, seed=1), calibrator=True)
    ms = str(tmp_path / "full.ms")
    write_ms(open_group(g.files), ms)
    t0 = time.perf_counter()
    summary = flag_ms(ms)
    elapsed = time.perf_counter() - t0
    truth, _ = truth_for_ms(ms, load_truth(g.truth))
    sc = scores(read_main(ms)["FLAG"], truth)
    print(f"\nflag_ms, 16 antennas x 768 channels x 24 integrations: precision "
          f"{sc['precision']:.4f} recall {sc['recall']:.4f} F1 {sc['f1']:.4f} clean "
          f"flagged {sc['clean_flagged']:.3%} in {elapsed:.1f} s "
          f"(timing {summary['timing_s']})")
    assert sc["precision"] >= 0.95 and sc["recall"] >= 0.95
    assert sc["clean_flagged"] <= 0.01


# ---------------------------------------------------------------------------------
# interop
# ---------------------------------------------------------------------------------

def _have_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


_CASA_FLAGMANAGER = r"""
import json, sys
from casatasks import flagmanager
from casatools import table
ms, mode = sys.argv[1], sys.argv[2]
listed = flagmanager(vis=ms, mode="list")
if mode == "restore":
    flagmanager(vis=ms, mode="restore", versionname="contimg_flag_1")
elif mode == "save":
    flagmanager(vis=ms, mode="save", versionname="by_casa", comment="saved by CASA")
tb = table()
tb.open(ms)
nflag = int(tb.getcol("FLAG").sum())
tb.close()
print(json.dumps({"versions": [v["name"] for k, v in listed.items() if k != "MS"],
                  "comments": [v["comment"] for k, v in listed.items() if k != "MS"],
                  "nflag": nflag}))
"""


@pytest.mark.interop
@pytest.mark.skipif(not _have_module("casatasks"), reason="casatasks is not installed")
def test_casa_flagmanager_lists_and_restores_our_backups(ms, tmp_path):
    from casarun import run_casa

    def casa(mode):
        res = run_casa(tmp_path, _CASA_FLAGMANAGER, ms, mode, name="fm.py")
        return json.loads(res.stdout.strip().splitlines()[-1])

    preflag(ms)
    orig = read_main(ms)
    flag_ms(ms)
    got = casa("restore")          # CASA restores the version we wrote
    assert got["versions"] == ["contimg_flag_1"]
    assert got["comments"][0].startswith("flags before contimg flag_ms")
    np.testing.assert_array_equal(read_main(ms)["FLAG"], orig["FLAG"])
    np.testing.assert_array_equal(read_main(ms)["FLAG_ROW"], orig["FLAG_ROW"])
    assert got["nflag"] == int(orig["FLAG"].sum())

    flag_ms(ms, backup_name="second")
    flagged = read_main(ms)
    got = casa("save")             # and we restore a version CASA wrote
    assert got["versions"] == ["contimg_flag_1", "second"]
    assert [v["name"] for v in list_flag_versions(ms)] == ["contimg_flag_1", "second",
                                                           "by_casa"]
    restore_flags(ms, "contimg_flag_1")
    np.testing.assert_array_equal(read_main(ms)["FLAG"], orig["FLAG"])
    restore_flags(ms, "by_casa")
    np.testing.assert_array_equal(read_main(ms)["FLAG"], flagged["FLAG"])
    np.testing.assert_array_equal(read_main(ms)["FLAG_ROW"], flagged["FLAG_ROW"])


@pytest.mark.interop
@pytest.mark.skipif(AOFLAGGER is None, reason="aoflagger is not installed")
def test_aoflagger_runs_on_our_flagged_ms(group, ms):
    """AOFlagger 3.1 (default strategy) flags an MS that flag_ms flagged; our backup
    still restores the original flags afterwards, and flag_ms runs after AOFlagger."""
    from contimg.io.ms import open_ms

    orig = read_main(ms)
    flag_ms(ms)
    ours = read_main(ms)
    res = subprocess.run([AOFLAGGER, "-j", "1", ms], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    ao = read_main(ms)
    assert ao["FLAG"].any() and not np.array_equal(ao["FLAG"], ours["FLAG"])
    truth, _ = truth_for_ms(ms, group["truth"])
    print(f"\nAOFlagger on the small group: {scores(ao['FLAG'], truth)}")
    back = open_ms(ms)
    np.testing.assert_array_equal(back.FLAG.values.reshape(ao["FLAG"].shape),
                                  ao["FLAG"] | ao["FLAG_ROW"][:, None, None])
    del back
    # AOFlagger rewrites FLAG but leaves FLAG_ROW alone (the rows we flagged whole stay
    # flagged: FLAG_ROW flags the row for CASA, WSClean and open_ms alike)
    assert np.all(ao["FLAG_ROW"] == ours["FLAG_ROW"])
    ao_eff = ao["FLAG"] | ao["FLAG_ROW"][:, None, None]
    summary = flag_ms(ms)          # AOFlagger's flags are the "before" now
    assert summary["before"]["overall"] == pytest.approx(ao_eff.mean(), abs=1e-12)
    assert np.all(read_main(ms)["FLAG"][ao_eff])
    restore_flags(ms, "contimg_flag_1")
    np.testing.assert_array_equal(read_main(ms)["FLAG"], orig["FLAG"])
