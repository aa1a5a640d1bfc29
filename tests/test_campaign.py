"""The multi-epoch simulation: truth, the photometry-level campaign through the stream's
normalisation/variability/ESE code, and one group per epoch at the visibility level."""

from __future__ import annotations

import numpy as np
import pytest

from contimg import campaign
from contimg.state import StateDB


def test_photometry_campaign_normalises_and_finds_dips(tmp_path):
    cfg = campaign.CampaignConfig(n_sources=120, n_epochs=50, n_ese=12, n_variable=10,
                                  ese_depth=(0.3, 0.6), seed=3)
    out = campaign.run_photometry_campaign(tmp_path / "c", tmp_path / "db.sqlite3", cfg)
    z = np.load(tmp_path / "c" / "campaign_truth.npz")
    assert z["true"].shape == (120, 50) and sorted(set(z["kind"])) == ["ese", "steady",
                                                                         "variable"]
    # each epoch's flux scale recovered within its error (3 sigma)
    got = np.array([s["scale"] for s in out["summaries"]])
    err = np.array([s["scale_err"] for s in out["summaries"]])
    true = np.array([s["true_scale"] for s in out["summaries"]])
    assert np.mean(np.abs(got - true) < 3 * err) > 0.95
    with StateDB(tmp_path / "db.sqlite3") as db:
        cands = {r["source_id"]: r for r in db.query(
            "SELECT * FROM ese_candidates WHERE preset='default'")}
        n = db.query("SELECT COUNT(*) AS n FROM photometry")[0]["n"]
        stats = {r["source_id"]: r for r in db.query("SELECT * FROM source_stats")}
    assert n == 120 * 50 and all(s["n"] == 50 for s in stats.values())
    kind = out["kind"]
    ids = out["ids"]
    deep = (kind == "ese") & (out["depth"] * out["sky"]["flux"] / out["sigma"] > 5)
    found = np.array([int(i) in cands for i in ids])
    assert found[deep].mean() >= 0.9
    assert found[kind == "steady"].mean() <= 0.02
    # the stored window overlaps the injected dip
    for k in np.flatnonzero(deep & found):
        c = cands[int(ids[k])]
        a, L = out["dip_start"][k], out["dip_len"][k]
        assert c["t_start"] <= out["times"][a + L - 1] + 86400
        assert c["t_end"] >= out["times"][a] - 86400
        assert c["evidence"]["light_curve"]["t"]
    # steady sources' eta is close to 1 (honest normalised errors)
    eta = np.array([stats[int(i)]["eta"] for i in ids[kind == "steady"]])
    assert 0.8 < np.median(eta) < 1.3


def test_groups_per_epoch_carry_the_truth(tmp_path):
    from contimg.simulate import SimConfig

    sim = SimConfig(n_ant=6, n_subbands=1, n_chan=2, n_times=2, rfi=None, threads=1)
    cfg = campaign.CampaignConfig(n_epochs=3, n_ese=2, n_variable=2, ese_days=(1, 1),
                                  seed=2)
    groups = campaign.simulate_campaign_groups(tmp_path, sim, cfg)
    assert len(groups) == 3
    z = np.load(tmp_path / "campaign_truth.npz")
    stamps = [g.stamp for g in groups]
    assert stamps[0].startswith("2026-01-15T08:00") and stamps[1].startswith("2026-01-16T07:5")
    for k, g in enumerate(groups):
        t = g.load_truth()
        # the group's sky is the truth of its epoch
        idx = {str(n): i for i, n in enumerate(z["name"])}
        for name, f in zip(t["sky_name"], t["sky_flux"]):
            assert f == pytest.approx(z["true"][idx[str(name)], k])
    assert np.any(z["true"].std(axis=1) > 0)
    assert (tmp_path / "campaign_sky.csv").is_file()


def test_sources_cli(tmp_path, capsys):
    from contimg.cli import main

    db = str(tmp_path / "db.sqlite3")
    assert main(["simulate-campaign", "--out", str(tmp_path / "c"), "--db", db, "--epochs",
                 "30", "--sources", "40", "--ese", "6", "--variable", "4", "--seed",
                 "5"]) == 0
    z = np.load(tmp_path / "c" / "campaign_truth.npz")
    capsys.readouterr()
    assert main(["sources", "candidates", "--db", db]) == 0
    out = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in out[1:]}
    ese = {str(n) for n, k in zip(z["name"], z["kind"]) if k == "ese"}
    assert names and names <= ese | {str(n) for n, k in zip(z["name"], z["kind"])
                                     if k == "variable"}
    assert main(["sources", "list", "--db", db, "--limit", "5"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    etas = [float(r.split()[6]) for r in rows]
    assert len(rows) == 5 and etas == sorted(etas, reverse=True)
    one = sorted(names)[0]
    assert main(["sources", "show", one, "--db", db]) == 0
    text = capsys.readouterr().out
    assert '"name": "%s"' % one in text and text.count("epoch") == 30
    assert main(["sources", "show", "nobody", "--db", db]) == 1
