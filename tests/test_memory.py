"""Memory that grows with the chunk, not the group (issue 17): calibration in passes over
chunks gives today's solutions, flagging on bounded baseline blocks gives today's flags,
the stream admits groups by a memory budget, and the simulator scales groups beyond
DSA-110. Small data throughout; the memory figures themselves are bench/memory.py's."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from contimg import calibrate as cc
from contimg import sky
from contimg.io.uvh5 import open_group
from contimg.simulate import SimConfig, layout_enu, n_visibilities, scaled, simulate_group

NSUB, NCHAN, NTIME, NANT = 2, 8, 6, 12


# ---------------------------------------------------------------------------------
# calibration in passes
# ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calgroup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memcal")
    cfg = SimConfig(n_ant=NANT, n_subbands=NSUB, n_chan=NCHAN, n_times=NTIME, rfi=None,
                    threads=1)
    g = simulate_group(tmp / "raw", cfg=cfg, calibrator=True)
    truth = g.load_truth()
    i = list(truth["sky_name"]).index("SIMCAL")
    src = sky.Source(name="SIMCAL", ra=float(truth["sky_ra"][i]),
                     dec=float(truth["sky_dec"][i]), flux_jy=float(truth["sky_flux"][i]),
                     alpha=float(truth["sky_alpha"][i]))
    cat = tmp / "cal.csv"
    cat.write_text("name,ra_deg,dec_deg,flux_jy,alpha\n"
                   f"SIMCAL,{float(np.degrees(src.ra))!r},{float(np.degrees(src.dec))!r},{src.flux_jy!r},"
                   f"{src.alpha!r}\n")
    ds = open_group(g.files, n_subbands=NSUB)
    # some flags, so that the sums' flag handling is compared too
    rng = np.random.default_rng(3)
    flag = ds.FLAG.values | (rng.random(ds.FLAG.shape) < 0.05)
    ds = ds.assign(FLAG=(ds.FLAG.dims, flag)).compute()
    return ds, src, str(cat)


def _model(ds, src):
    from graphs import calibrate as gcal

    flux = sky.apparent_flux([src], ds.PHASE_CENTER_RA.values, ds.PHASE_CENTER_DEC.values,
                             ds.frequency.values)
    return gcal.predict_model(ds, [src.ra], [src.dec], flux)


@pytest.mark.parametrize("time_chunk,opts", [
    (None, {}),                                       # one time chunk: two fused passes
    (2, {}),                                          # three time chunks: four passes
    (4, dict(gain_interval=2, gain_mode="p")),
    (None, dict(phase_pass=False, gain_interval=3)),
    (1, dict(phase_pass=False)),
])
def test_solutions_in_passes_equal_the_one_graph_solve(calgroup, time_chunk, opts):
    import dask

    from graphs import calibrate as gcal
    from graphs import calpasses

    ds, src, _ = calgroup
    ref = ds.chunk({"frequency": NCHAN})
    (one,) = dask.compute(gcal.solve(ref, _model(ref, src), **opts))
    ds = ds.chunk({"frequency": NCHAN, "time": time_chunk or -1})
    batch = 1 if time_chunk == 2 else 2          # computes of one frequency chunk, or two
    steps = calpasses.solve_steps(ds, _model(ds, src), batch=batch, **opts)
    npass = 0
    lazy = next(steps)
    while True:
        npass += 1
        try:
            lazy = steps.send(list(dask.compute(*lazy)))
        except StopIteration as stop:
            sol = stop.value
            break
    phase = opts.get("phase_pass", True)
    assert npass == ((2 if phase else 1) if time_chunk in (None, NTIME) else
                     (4 if phase else 2)) * (NSUB // batch)
    assert set(sol.data_vars) == set(one.data_vars) and sol.attrs == one.attrs
    assert int(sol.REFANT) == int(one.REFANT)
    np.testing.assert_array_equal(sol.gain_time.values, one.gain_time.values)
    for name in sol.data_vars:
        a, b = sol[name].values, one[name].values
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype.kind in "biu":
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6 * np.abs(b).max(),
                                       err_msg=name)
    assert not sol.BANDPASS_FLAG.values.all()          # there is something to compare


def test_calibration_chunks_are_bounded_by_bytes_not_baselines():
    """Full DSA-110 group: today's chunk (24 integrations x 48 channels); 2x and 4x the
    antennas: every integration still in one chunk (two reads, not four), fewer
    channels, the same bytes; a group whose single channel exceeds the budget: time
    chunks of a subband's channels."""
    for nant, chans in ((96, 48), (136, 24), (193, 12)):
        nbl = nant * (nant + 1) // 2
        ch = cc.calibration_chunks(24, nbl, 2, 48)
        assert ch == {"time": 24, "frequency": chans}
        assert 24 * nbl * chans * 2 * 8 <= cc.CHUNK_BYTES
        assert 48 % ch["frequency"] == 0              # never straddles two MS tiles
    nbl = 2000 * 2001 // 2                            # DSA-2000
    ch = cc.calibration_chunks(24, nbl, 2, 48)
    assert ch["frequency"] == 48 and 1 <= ch["time"] < 24
    assert ch["time"] * nbl * 48 * 2 * 8 <= cc.CHUNK_BYTES or ch["time"] == 1
    assert cc.calibration_chunks(24, 4656, 2, 48, budget=1) == {"time": 1, "frequency": 48}


def test_narrower_frequency_chunks_give_the_same_solutions(calgroup, tmp_path):
    """calibrate_ms on an MS opened in chunks of fewer channels (as a larger group is):
    the solutions of the subband-wide chunks within float rounding (the bandpass, per
    channel, from the same sums; the gain sums added in another order)."""
    from contimg.io.ms import write_ms

    ds, src, cat = calgroup
    ms = str(tmp_path / "g.ms")
    write_ms(ds, ms)
    wide = cc.calibrate_ms(ms, out_dir=str(tmp_path / "a"), catalog=cat).solutions
    per_chan = NTIME * ds.sizes["baseline_id"] * 2 * 8
    narrow_calls = []
    orig = cc.calibration_chunks

    def narrow(*a, **k):
        narrow_calls.append(orig(*a, budget=2 * per_chan))
        return narrow_calls[-1]

    import unittest.mock as um
    with um.patch.object(cc, "calibration_chunks", narrow):
        got = cc.calibrate_ms(ms, out_dir=str(tmp_path / "b"), catalog=cat).solutions
    assert narrow_calls == [{"time": NTIME, "frequency": 2}]
    for name in wide.data_vars:
        a, b = got[name].values, wide[name].values
        if a.dtype.kind in "biu":
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6 * np.abs(b).max(),
                                       err_msg=name)


def test_solve_dataset_uses_passes(calgroup, monkeypatch):
    """solve_dataset goes through the passes and never through the one-graph solve."""
    from graphs import calibrate as gcal

    ds, src, cat = calgroup
    monkeypatch.setattr(gcal, "solve", lambda *a, **k: pytest.fail("one-graph solve used"))
    sol, _, q = cc.solve_dataset(ds.chunk({"time": 2, "frequency": NCHAN}), catalog=cat)
    assert q["bandpass_converged_fraction"] == 1.0
    assert sol.BANDPASS.shape[1:] == (NSUB * NCHAN, 2)


# ---------------------------------------------------------------------------------
# imaging: the averaging reads baseline blocks of an MS
# ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def img_ms(calgroup, tmp_path_factory):
    """The calibrator group as an MS with a few rows stored as (ant2, ant1) and some
    FLAG_ROWs: the block reader must give what open_ms gives."""
    from casacore import tables as ct

    from contimg.io.ms import write_ms

    ds, _, _ = calgroup
    ms = str(tmp_path_factory.mktemp("memimg") / "g.ms")
    write_ms(ds, ms)
    with ct.table(ms, readonly=False, ack=False) as tb:
        a1, a2 = tb.getcol("ANTENNA1"), tb.getcol("ANTENNA2")
        rows = np.nonzero(a1 != a2)[0][::7]
        d = tb.getcol("DATA")
        tb.putcol("ANTENNA1", np.where(np.isin(np.arange(a1.size), rows), a2, a1))
        tb.putcol("ANTENNA2", np.where(np.isin(np.arange(a1.size), rows), a1, a2))
        d[rows] = np.conj(d[rows])
        tb.putcol("DATA", d)
        fr = tb.getcol("FLAG_ROW")
        fr[5::53] = True
        tb.putcol("FLAG_ROW", fr)
    return ms


def test_baseline_block_reads_equal_open_ms(img_ms):
    from contimg.io.ms import open_ms
    from contimg.io.mscolumns import baseline_block_reads

    ds = open_ms(img_ms, chunks={"frequency": 4})
    got = baseline_block_reads(ds, 10)
    assert got.VISIBILITY.data.chunks[1] == (10,) * (ds.sizes["baseline_id"] // 10) + (
        (ds.sizes["baseline_id"] % 10,) if ds.sizes["baseline_id"] % 10 else ())
    assert got.VISIBILITY.data.chunks[0] == (ds.sizes["time"],)
    assert got.VISIBILITY.data.chunks[2] == ds.VISIBILITY.data.chunks[2]
    for name in ("VISIBILITY", "FLAG", "WEIGHT"):
        a, b = ds[name].values, got[name].values
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(b, a, err_msg=name)
    assert ds.FLAG.values.any() and not ds.FLAG.values.all()


def test_averaged_rows_of_baseline_blocks_are_the_same(img_ms):
    """average_dataset over baseline blocks: the rows of the whole chunks, bit for bit."""
    import math

    from contimg.io.ms import open_ms
    from contimg.io.mscolumns import baseline_block_reads
    from contimg.uvw import compute_uvw
    from graphs import image as gi
    from kernels import averaging as ka

    ds = open_ms(img_ms)
    mid = ds.sizes["time"] // 2
    ra0, dec0 = float(ds.PHASE_CENTER_RA[mid]), float(ds.PHASE_CENTER_DEC[mid])
    uvw = compute_uvw(np.asarray(ds.ANTENNA_POSITION.values, dtype=np.float64),
                      ds.baseline_antenna1_id.values, ds.baseline_antenna2_id.values,
                      np.asarray(ds.time.values, float), np.full(ds.sizes["time"], ra0),
                      np.full(ds.sizes["time"], dec0))
    freq = ds.frequency.values
    tf, ff = ka.bda_factors(uvw, freq, float(np.diff(freq)[0]), math.radians(2.0), 0.02,
                            NCHAN)
    assert tf.max() > 1
    ref = gi.average_dataset(ds, uvw, tf, ff).compute()
    blk = gi.average_dataset(baseline_block_reads(ds, 17), uvw, tf, ff)
    assert len(blk.VIS_I.data.chunks[0]) > len(ds.VISIBILITY.data.chunks[2])
    blk = blk.compute()
    for name in ref.data_vars:
        np.testing.assert_array_equal(blk[name].values, ref[name].values, err_msg=name)


def test_image_of_an_ms_in_baseline_blocks_equals_todays(img_ms, tmp_path, monkeypatch):
    """image_ms with the averaging's baseline blocks (a budget the group exceeds): the
    images of the whole-chunk averaging within rounding (gridded in double precision
    here: the rows are the same, only the parts they are gridded in differ)."""
    from contimg import imaging
    from contimg import imaging_steps as st
    from contimg.io import mscolumns

    opts = dict(npix=256, cell_arcsec=20.0, niter=100, grid_tasks=2, keep_products=True,
                double=True)
    ref = imaging.image_ms(img_ms, str(tmp_path / "a" / "g"), **opts).products
    calls = []
    orig = mscolumns.baseline_block_reads

    def spy(ds, block, *a, **k):
        calls.append(block)
        return orig(ds, block, *a, **k)

    monkeypatch.setattr(mscolumns, "baseline_block_reads", spy)
    monkeypatch.setattr(st, "AVERAGE_BLOCK_BYTES", NTIME * 20 * NCHAN * 2 * 8)
    got = imaging.image_ms(img_ms, str(tmp_path / "b" / "g"), **opts).products
    assert calls and calls[0] <= 20
    assert got.n_components == ref.n_components and got.n_major == ref.n_major
    peak = float(np.abs(ref.image).max())
    for name in ("dirty", "psf", "residual", "model", "image"):
        assert np.abs(getattr(got, name) - getattr(ref, name)).max() < 1e-9 * peak, name


# ---------------------------------------------------------------------------------
# simulator scaling
# ---------------------------------------------------------------------------------

def test_scaled_groups_hold_factor_times_the_visibilities():
    base = SimConfig()
    full = n_visibilities(base)
    assert full == 96 * 97 // 2 * 768 * 24 * 2            # 171 M, a full DSA-110 group
    for f in (2, 4):
        a = scaled(f, "antennas")
        nb = a.n_ant * (a.n_ant + 1) // 2
        # the smallest antenna count that reaches f times the baselines
        assert nb >= f * 4656 > (a.n_ant - 1) * a.n_ant // 2
        assert n_visibilities(scaled(f, "channels")) == f * full
        assert scaled(f, "channels").n_chan == 48 * f
        assert scaled(f, "times").n_times == 24 * f
    assert (scaled(2, "antennas").n_ant, scaled(4, "antennas").n_ant) == (136, 193)
    small = SimConfig(n_ant=8, n_subbands=2, n_chan=4, n_times=3)
    assert scaled(3, "times", small).n_times == 9 and scaled(3, "times", small).n_ant == 8
    with pytest.raises(ValueError, match="whole number"):
        scaled(1.5, "times", small)
    with pytest.raises(ValueError, match="scale axis"):
        scaled(2, "baselines")


def test_layout_beyond_117_stations_extends_the_arms():
    enu, names = layout_enu(130)
    base, _ = layout_enu(117)
    assert enu.shape == (130, 3) and len(set(names)) == 130
    np.testing.assert_array_equal(enu[:117], base)
    extra = enu[117:]
    # on the arms' lines, beyond their ends, no two stations on the same pad
    ew = np.abs(extra[:, 1]) < 2
    assert np.all(np.abs(extra[ew, 0]) > 200) and np.all(extra[~ew, 1] > 440)
    d = np.linalg.norm(enu[:, None, :2] - enu[None, :, :2], axis=-1)
    assert d[np.triu_indices(130, 1)].min() > 1.0


def test_simulated_group_beyond_dsa110(tmp_path):
    """120 antennas (more than DSA-110's 117 stations) and 96 channels per subband:
    the files read back with every baseline and channel."""
    cfg = scaled(2, "channels", SimConfig(n_ant=120, n_subbands=1, n_chan=48, n_times=2,
                                          rfi=None, threads=1))
    g = simulate_group(tmp_path, cfg=cfg, calibrator=True)
    ds = open_group(g.files, n_subbands=1)
    assert ds.sizes["baseline_id"] == 120 * 121 // 2 and ds.sizes["frequency"] == 96
    assert ds.sizes["antenna_id"] == 120
    width = np.diff(ds.frequency.values)
    np.testing.assert_allclose(width, 244140.625 / 2)
    vis = ds.VISIBILITY.values
    assert np.isfinite(vis).all() and np.abs(vis).mean() > 0


def test_cli_simulate_scale(tmp_path):
    from contimg.cli import main

    rc = main(["simulate", "--out", str(tmp_path), "--antennas", "6", "--subbands", "1",
               "--channels", "4", "--integrations", "2", "--no-rfi",
               "--scale", "2", "--scale-axis", "times"])
    assert rc == 0
    ds = open_group(sorted(tmp_path.glob("*.hdf5")), n_subbands=1)
    assert ds.sizes["time"] == 4 and ds.sizes["baseline_id"] == 21


# ---------------------------------------------------------------------------------
# flagging on bounded baseline blocks
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("block_baselines", [7, 1000])
def test_flag_ms_on_baseline_blocks_gives_todays_flags(tmp_path, monkeypatch, block_baselines):
    """flag_ms reads, flags and writes per baseline block (here 7 baselines, i.e. 11
    blocks, or one block): the flags are those of the one-graph flagger on the whole
    MS (open_ms + graphs.flag.flag_dataset), bit for bit, with some flags and a
    FLAG_ROW set beforehand."""
    from casacore import tables as ct

    from contimg import flagging
    from contimg.io.ms import open_ms, write_ms
    from graphs.flag import flag_dataset

    cfg = SimConfig(n_ant=11, n_subbands=2, n_chan=16, n_times=8, threads=1)
    g = simulate_group(tmp_path / "raw", cfg=cfg)
    ms = str(tmp_path / "g.ms")
    write_ms(open_group(g.files, n_subbands=2), ms)
    rng = np.random.default_rng(5)
    with ct.table(ms, readonly=False, ack=False) as tb:
        f = tb.getcol("FLAG")
        f |= rng.random(f.shape) < 0.03
        tb.putcol("FLAG", f)
        fr = tb.getcol("FLAG_ROW")
        fr[17] = True
        tb.putcol("FLAG_ROW", fr)
    ds = open_ms(ms)
    want = flag_dataset(ds).FLAG.values
    before = ds.FLAG.values
    del ds
    plane = 8 * 32 * 2 * 8
    monkeypatch.setattr(flagging, "BLOCK_BYTES", block_baselines * plane)
    reads = []
    real = flagging._read_block
    monkeypatch.setattr(flagging, "_read_block",
                        lambda proxy, layout, col, conj, bsl, nf: reads.append(bsl) or real(
                            proxy, layout, col, conj, bsl, nf))
    summary = flagging.flag_ms(ms, backup=False)
    assert len(reads) == -(-66 // min(block_baselines, 66))
    assert max(b.stop - b.start for b in reads) == min(block_baselines, 66)
    got = open_ms(ms).FLAG.values
    assert (want & ~before).any()                      # the flagger found something
    np.testing.assert_array_equal(got, want)
    assert summary["after"]["overall"] == pytest.approx(want.mean())


def test_flagging_inside_convert_is_bounded_and_gives_todays_flags(tmp_path, monkeypatch):
    """convert_group(flag=True) (the stream's default) flags the MS it wrote per
    baseline block (here 7 of 66 baselines per read: 10 reads of FLAG-sized blocks,
    never the group): the MS's flags are the one-graph flagger's on the group's
    Dataset (graphs.flag.flag_dataset on open_group), bit for bit."""
    from distributed import Client, LocalCluster

    from contimg import flagging
    from contimg.convert import convert_group
    from contimg.io.ms import open_ms
    from graphs.flag import flag_dataset

    cfg = SimConfig(n_ant=11, n_subbands=2, n_chan=16, n_times=8, threads=1)
    g = simulate_group(tmp_path / "raw", cfg=cfg)
    want = flag_dataset(open_group(g.files, n_subbands=2)).FLAG.values
    assert 0.001 < want.mean() < 0.5                   # the flagger found something
    plane = 8 * 32 * 2 * 8
    monkeypatch.setattr(flagging, "BLOCK_BYTES", 7 * plane)
    reads = []
    real = flagging._read_block
    monkeypatch.setattr(flagging, "_read_block",
                        lambda proxy, layout, col, conj, bsl, nf: reads.append(bsl) or real(
                            proxy, layout, col, conj, bsl, nf))
    ms = tmp_path / "g.ms"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as lc, Client(lc, set_as_default=False) as cl:
        res = convert_group(cl, g.files, ms, placement="any", flag=True,
                            n_subbands=2).result()
    assert len(reads) == -(-66 // 7) and max(b.stop - b.start for b in reads) == 7
    np.testing.assert_array_equal(open_ms(ms).FLAG.values, want)
    assert res["flagged"] == pytest.approx(want.mean())
    assert flagging.list_flag_versions(ms) == []             # no flag version kept


def test_packed_codes_combine_as_the_codes_do():
    """The flagger keeps a block's flags as bits (kernels.flagging.pack_codes) until the
    array-wide decisions: combine_packed of the bits gives combine_codes of the codes,
    bit for bit, also for blocks whose size is not a multiple of 8."""
    from kernels.flagging import combine_codes, combine_packed, pack_codes

    rng = np.random.default_rng(11)
    for shape in ((3, 5, 7, 2), (4, 6, 16, 2), (1, 1, 1, 1), (2, 3, 5, 1)):
        codes = rng.choice(np.array([0, 1, 2], np.uint8), size=shape, p=[0.8, 0.1, 0.1])
        bits = pack_codes(codes)
        assert bits.size == -(-codes.size // 8)
        np.testing.assert_array_equal(bits, np.packbits(codes != 0))
        bad_bl = rng.random(shape[1]) < 0.3
        bad_tf = rng.random((shape[0], shape[2])) < 0.2
        np.testing.assert_array_equal(combine_packed(bits, *shape, bad_bl, bad_tf),
                                      combine_codes(codes, bad_bl, bad_tf))


def test_flag_ms_keeps_the_flags_as_bits_in_files_beside_the_ms(tmp_path, monkeypatch):
    """flag_ms holds no group-sized array until its array-wide decisions: each block's
    flags wait as bits (1/8 byte per visibility) in a file of a directory beside the
    MS, which is removed afterwards, also when the flagging fails; a directory left by
    a dead process is removed by the next run; the flags are the one-graph flagger's."""
    from contimg import flagging
    from contimg.io.ms import open_ms, write_ms
    from graphs.flag import flag_dataset

    cfg = SimConfig(n_ant=11, n_subbands=2, n_chan=16, n_times=8, threads=1)
    g = simulate_group(tmp_path / "raw", cfg=cfg)
    ms = str(tmp_path / "g.ms")
    write_ms(open_group(g.files, n_subbands=2), ms)
    want = flag_dataset(open_ms(ms)).FLAG.values
    host = socket.gethostname()
    stale = tmp_path / f"g.ms{flagging.BITS_SUFFIX}{host}-999999999-deadbeef"  # no such pid
    stale.mkdir()
    # another node's (on a shared disk): its PID says nothing here, it is left alone
    other = tmp_path / f"g.ms{flagging.BITS_SUFFIX}other-node-999999999-deadbeef"
    other.mkdir()
    plane = 8 * 32 * 2 * 8
    monkeypatch.setattr(flagging, "BLOCK_BYTES", 7 * plane)
    puts = []
    real_put = flagging._BitFiles.put

    def put(self, bits):
        path = real_put(self, bits)
        puts.append((os.path.dirname(path), bits.nbytes, os.path.getsize(path)))
        return path
    monkeypatch.setattr(flagging._BitFiles, "put", put)
    flagging.flag_ms(ms, backup=False)
    assert len(puts) == -(-66 // 7)                          # one file per block
    for d, nbytes, size in puts:
        assert os.path.dirname(d) == str(tmp_path) and nbytes == size
    assert sum(n for _, n, _ in puts) == sum(-(-(8 * b * 32 * 2) // 8) for b in
                                             [7] * 9 + [3])  # one bit per visibility
    assert not os.path.exists(puts[0][0]) and not stale.exists() and other.exists()
    other.rmdir()
    np.testing.assert_array_equal(open_ms(ms).FLAG.values, want)

    # a failure after the bits were written: the directory goes too
    puts.clear()
    monkeypatch.setattr(flagging, "_write_block_hook", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        flagging.flag_ms(ms, backup=False)
    assert puts and not os.path.exists(puts[0][0])
    assert not [p for p in os.listdir(tmp_path) if flagging.BITS_SUFFIX in p]


def test_convert_blocks_of_bounded_bytes_write_the_same_ms(tmp_path, monkeypatch):
    """convert_group reads and writes blocks of at most BLOCK_BYTES of visibilities (the
    time chunk adapts to the baselines: here 3 + 3 + 2 integrations): the MS is the one
    written from whole-subband blocks, column for column."""
    from casacore import tables as ct
    from distributed import Client, LocalCluster

    from contimg import convert

    cfg = SimConfig(n_ant=11, n_subbands=2, n_chan=16, n_times=8, threads=1)
    g = simulate_group(tmp_path / "raw", cfg=cfg)
    per_time = 66 * 16 * 2 * 8
    ds = open_group(g.files, n_subbands=2, chunks={"block_bytes": 3 * per_time})
    assert ds.VISIBILITY.data.chunks[0] == (3, 3, 2)
    assert open_group(g.files, n_subbands=2,
                      chunks={"block_bytes": 100 * per_time}).VISIBILITY.data.chunks[0] == (8,)
    assert open_group(g.files, n_subbands=2,
                      chunks={"block_bytes": 1}).VISIBILITY.data.chunks[0] == (1,) * 8
    monkeypatch.setattr(convert, "BLOCK_BYTES", 3 * per_time)
    keys = []
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as lc, Client(lc, set_as_default=False) as cl:
        lc.scheduler.add_plugin(_key_recorder(keys))
        convert.convert_group(cl, g.files, tmp_path / "small.ms", placement="any",
                              n_subbands=2).result()
        n_small = len([k for k in keys if str(k).startswith("read-")])
        keys.clear()
        convert.convert_group(cl, g.files, tmp_path / "whole.ms", placement="any",
                              n_subbands=2, chunks={"time": None}).result()
        n_whole = len([k for k in keys if str(k).startswith("read-")])
    assert (n_small, n_whole) == (2 * 3, 2)
    with ct.table(str(tmp_path / "small.ms"), ack=False) as a, \
            ct.table(str(tmp_path / "whole.ms"), ack=False) as b:
        assert a.nrows() == b.nrows() and sorted(a.colnames()) == sorted(b.colnames())
        for col in a.colnames():
            if a.iscelldefined(col, 0):
                np.testing.assert_array_equal(a.getcol(col), b.getcol(col), err_msg=col)
        for col in ("DATA", "FLAG"):                              # same tiles
            np.testing.assert_array_equal(a.getdminfo(col)["SPEC"]["DEFAULTTILESHAPE"],
                                          b.getdminfo(col)["SPEC"]["DEFAULTTILESHAPE"])


def _key_recorder(keys):
    """A scheduler plugin recording the keys of the tasks that reached memory."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class KeyRecorder(SchedulerPlugin):
        name = "key-recorder"

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "memory":
                keys.append(key)
    return KeyRecorder()


# ---------------------------------------------------------------------------------
# admission by a memory budget
# ---------------------------------------------------------------------------------

def test_parse_memory_limit():
    from contimg.admission import parse_bytes

    assert parse_bytes("auto") is None
    assert parse_bytes("off") == 0 and parse_bytes("0") == 0
    assert parse_bytes("6GiB") == 6 * 2 ** 30 and parse_bytes("6 GB") == 6_000_000_000
    assert parse_bytes("6.5e9") == 6_500_000_000 and parse_bytes("512MiB") == 2 ** 29
    assert parse_bytes(4e9) == 4_000_000_000
    for bad in ("lots", "6 parsecs", "-1GB"):
        with pytest.raises(ValueError, match="memory limit"):
            parse_bytes(bad)


def test_admission_reserves_per_visibility_and_says_why(caplog):
    from contimg.admission import Admission

    full = n_visibilities(SimConfig())                 # 171 M visibilities
    adm = Admission(int(7.5 * 2 ** 30), per_visibility=20.0)   # room for two full groups
    assert adm.check("a", full) is None
    adm.admit("a", full)
    assert adm.check("b", full) is None
    adm.admit("b", full)
    why = adm.check("c", full)
    assert why and "memory budget" in why and "2 group(s) in flight" in why
    with caplog.at_level("INFO", logger="contimg.admission"):
        adm.waiting("c", why)
        adm.waiting("c", why)                          # said once
    assert sum("group c: waits: memory budget" in r.message for r in caplog.records) == 1
    adm.release("a")
    assert adm.check("c", full) is None
    # a group bigger than the whole budget still runs when nothing else does
    big = n_visibilities(scaled(4, "antennas"))
    adm.release("b")
    assert adm.check("d", big) is None
    adm.admit("d", big)
    assert adm.check("e", 1000) is not None
    # no budget: slots only
    off = Admission(0, 20.0)
    off.admit("a", big)
    assert off.check("b", big) is None


def test_auto_limit_is_the_workers_memory():
    from contimg.admission import Admission

    class FakeClient:
        def scheduler_info(self):
            return {"workers": {"w1": {"memory_limit": 3 * 2 ** 30},
                                "w2": {"memory_limit": 2 ** 30}}}

    assert Admission.from_settings("auto", 20.0, FakeClient()).limit == 4 * 2 ** 30
    assert Admission.from_settings("5GiB", 20.0, FakeClient()).limit == 5 * 2 ** 30
    assert Admission.from_settings("auto", 20.0, None).limit == 0


def test_memory_limit_setting_and_cli_option():
    from contimg.cli import build_parser
    from contimg.config import from_args

    args = build_parser().parse_args(["stream", "--memory-limit", "6GiB"])
    assert from_args(args).stream.memory_limit == "6GiB"
    from contimg.config import StreamSettings

    with pytest.raises(ValueError, match="memory limit"):
        StreamSettings(memory_limit="plenty")


def test_stream_admits_by_memory_budget(tmp_path, caplog):
    """Two slots, but a budget for one group: the groups run one after the other and
    the log says why the second waits."""
    import datetime as dt
    import shutil

    from distributed import Client, LocalCluster

    from contimg.state import StateDB
    from contimg.stream import Stream, StreamConfig

    cfg_sim = SimConfig(n_ant=6, n_subbands=2, n_chan=4, n_times=6, rfi=None, threads=1)
    nvis = n_visibilities(cfg_sim)
    inc = tmp_path / "in"
    for i in range(2):
        g = simulate_group(tmp_path / f"g{i}", dt.datetime(2026, 1, 15, 8, 0, 0)
                           + dt.timedelta(seconds=i * 6 * 12.884901888), cfg=cfg_sim)
        inc.mkdir(exist_ok=True)
        for f in g.files:
            shutil.copy(f, inc / f.name)
    per_vis = 20.0
    cfg = StreamConfig(incoming=inc, output=tmp_path / "out", db_path=tmp_path / "db.sqlite3",
                       n_subbands=2, min_subbands=2, settle_s=0.2, poll_s=0.2, in_flight=2,
                       skip=frozenset({"calibrate", "apply", "image"}),
                       memory_limit=str(int(1.5 * per_vis * nvis)),
                       memory_per_visibility=per_vis)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as lc, Client(lc) as client:
        with caplog.at_level("INFO", logger="contimg.admission"):
            stream = Stream(cfg, client, db=StateDB(cfg.db_path))
            stream.run(until_idle=True, timeout=300)
    assert len(stream.completed) == 2, stream.failed
    db = StateDB(cfg.db_path)
    (a, b) = sorted((db.group(gid) for gid in stream.completed), key=lambda g: g["started_at"])
    assert b["started_at"] >= a["finished_at"]            # never both in flight
    assert any("waits: memory budget" in r.message for r in caplog.records)
