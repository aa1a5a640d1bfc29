"""The operator app's REST API under load, and the Overview page in chromium.

    python bench/api.py [--clients 50] [--seconds 20] [--think 0.5] [--groups 10000]
                        [--images 1000] [--photometry 100000] [--no-browser]

Builds a state database of ``--groups`` groups (with events, stage timings and a
Measurement Set each), ``--images`` images and ``--photometry`` photometry rows (1000
sources), starts ``contimg app`` on it in its own process, and while a writer thread
plays the stream (a new group every 50 ms taken through pending -> in_progress ->
completed with its stage timings and an image registered), ``--clients`` concurrent
httpx clients call ``/api/status``, ``/api/groups`` and a source's light curve in turn
for ``--seconds`` (clients spread over ``--procs`` processes). Two client models:

* polling: each client waits ``--think`` seconds between its requests (a dashboard or
  script polling; 50 clients at 0.5 s offer 100 requests/s), the clients starting at
  staggered moments within the first period as independent pollers do;
* closed loop: no waiting (every client fires its next request when the last returns),
  which measures the server's saturation throughput; latency there is queueing.

Prints p50/p99 latency per endpoint for both, against the target p99 < 100 ms (each
client's first request, which opens its connection, is reported apart as the cold
start), and the
Overview page's load time in chromium (login excluded; navigation until the queue
counts are on screen; median of 3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_P99_MS = 100.0
STAGES = ("convert", "flag", "calibrate", "apply", "image", "total")


def _iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))


def build_db(path: Path, n_groups: int, n_images: int, n_phot: int) -> dict:
    """Bulk-insert a realistic database (parameterised executemany)."""
    import numpy as np

    from contimg.app.accounts import Accounts
    from contimg.state import StateDB

    rng = np.random.default_rng(0)
    db = StateDB(path)
    now = time.time()
    t0 = now - n_groups * 300.0
    gids = [_iso(t0 + 300 * i) for i in range(n_groups)]
    states = rng.choice(["completed"] * 18 + ["failed", "pending"], n_groups)
    with db.transaction() as con:
        con.executemany(
            "INSERT INTO groups (group_id, t_start, state, n_expected, n_present, attempts, "
            "error, created_at, updated_at, started_at, finished_at) VALUES "
            "(?,?,?,16,16,1,?,?,?,?,?)",
            [(g, t0 + 300 * i, s, "image: out of memory" if s == "failed" else None,
              t0 + 300 * i, t0 + 300 * i + 400, t0 + 300 * i + 320,
              t0 + 300 * i + 380 if s != "pending" else None)
             for i, (g, s) in enumerate(zip(gids, states))])
        con.executemany(
            "INSERT INTO group_events (group_id, from_state, to_state, at) VALUES (?,?,?,?)",
            [(g, a, b, t0 + 300 * i + k) for i, g in enumerate(gids)
             for k, (a, b) in enumerate((("collecting", "pending"), ("pending", "in_progress"),
                                         ("in_progress", "completed")))])
        con.executemany(
            "INSERT INTO stage_timings (group_id, attempt, stage, status, seconds, started_at) "
            "VALUES (?,1,?,'ok',?,?)",
            [(g, s, float(rng.uniform(3, 30)), t0 + 300 * i) for i, g in enumerate(gids)
             for s in STAGES])
        con.executemany(
            "INSERT INTO measurement_sets (path, group_id, t_start, nbytes, flagged_fraction, "
            "status, created_at, updated_at) VALUES (?,?,?,?,?,'calibrated',?,?)",
            [(f"/data/products/ms/{g}.ms", g, t0 + 300 * i, 2 << 30, 0.05, now, now)
             for i, g in enumerate(gids)])
        step = max(1, n_groups // max(n_images, 1))
        con.executemany(
            "INSERT INTO images (path, group_id, ms_path, noise_jy, peak_jy, beam, qa, "
            "created_at) VALUES (?,?,?,?,?,?,?,?)",
            [(f"/data/products/images/{g}-image.fits", g, f"/data/products/ms/{g}.ms", 0.001,
              0.8, json.dumps({"bmaj_arcsec": 30, "bmin_arcsec": 20, "bpa_deg": 0}),
              json.dumps({"n_components": 500}), t0 + 300 * i + 380)
             for i, g in enumerate(gids[::step][:n_images])])
        n_src = 1000
        con.executemany("INSERT INTO sources (id, name, ra_deg, dec_deg, flux_jy) VALUES "
                        "(?,?,?,?,?)", [(k + 1, f"S{k:04d}", float(rng.uniform(0, 360)),
                                         54.5, 0.1) for k in range(n_src)])
        imgs = [f"/data/products/images/{g}-image.fits" for g in gids[::step][:n_images]]
        per = max(1, n_phot // n_src)
        con.executemany(
            "INSERT INTO photometry (source_id, image_path, t_mid, flux_jy, err_jy) VALUES "
            "(?,?,?,?,?)",
            [(k + 1, imgs[j % len(imgs)], t0 + 300 * j, 0.1, 0.001) for k in range(n_src)
             for j in range(per)])
    acc = Accounts(db)
    acc.add("bench", "viewer", "bench-password-1")
    token = acc.new_token("bench")
    db.close()
    return {"token": token, "sources": n_src}


def writer(path, stop, done, period=0.05):
    """Plays the stream (its own process, like the stream): a new group every ``period``
    s through to completed, with stage timings and an image, through the StateDB API."""
    from contimg.state import StateDB

    db = StateDB(path)
    t = time.time() + 86400
    n = 0
    while not stop.is_set():
        gid = _iso(t + 300 * n)
        db.add_file(f"/data/incoming/{gid}_sb00.hdf5", subband=0, timestamp=t,
                    group_id=gid, t_start=t + 300 * n, n_expected=1)
        db.transition(gid, "pending")
        db.claim(gid)
        for s in STAGES:
            db.record_stage(gid, 1, s, "ok", 1.0, time.time())
        db.register_image(f"/data/products/images/{gid}-image.fits", group_id=gid,
                          noise_jy=0.001, peak_jy=1.0)
        db.transition(gid, "completed", expect="in_progress")
        n += 1
        done.value = n
        time.sleep(period)
    db.close()


def load_proc(url, token, n_sources, clients, first, seconds, think, out):
    out.put(asyncio.run(load(url, token, n_sources, clients, seconds, think, first)))


def run_load(url, token, n_sources, clients, procs, seconds, think):
    """``clients`` clients spread over ``procs`` processes (one Python process cannot
    drive 50 httpx clients without becoming the bottleneck itself)."""
    import multiprocessing as mp

    q = mp.Queue()
    per = [clients // procs + (k < clients % procs) for k in range(procs)]
    ps = [mp.Process(target=load_proc, args=(url, token, n_sources, n, sum(per[:k]),
                                             seconds, think, q)) for k, n in enumerate(per)]
    for p in ps:
        p.start()
    res = [q.get() for _ in ps]
    for p in ps:
        p.join()
    lat = {k: sum((r[0][k] for r in res), []) for k in res[0][0]}
    srv = {k: sum((r[2][k] for r in res), []) for k in res[0][2]}
    return lat, sum((r[1] for r in res), []), srv, sum((r[3] for r in res), [])


async def load(url, token, n_sources, clients, seconds, think, first=0):
    import httpx

    paths = {"status": "/api/status", "groups": "/api/groups",
             "lightcurve": None}
    lat = {k: [] for k in paths}
    srv = {k: [] for k in paths}
    first_req = []
    errors = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                 limits=limits, timeout=60) as c:
        async def client(k):
            i = k
            if think:   # pollers are not phase-locked: each starts at its own moment
                await asyncio.sleep(think * ((k * 0.618034) % 1.0))
            while time.perf_counter() < deadline:
                name = list(paths)[i % 3]
                path = paths[name] or f"/api/sources/{1 + (i * 7919) % n_sources}/lightcurve"
                t = time.perf_counter()
                r = await c.get(path)
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    errors.append((path, r.status_code))
                # a client's first request opens its connection (50 at once at the
                # start): reported apart, as the cold start, not in the steady state
                (first_req if i == k else lat[name]).append(dt)
                st = r.headers.get("server-timing", "")
                if "dur=" in st:
                    srv[name].append(float(st.split("dur=")[1]) / 1e3)
                i += 1
                if think:
                    await asyncio.sleep(think)

        await asyncio.gather(*(client(first + k) for k in range(clients)))
    return lat, errors, srv, first_req


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1e3


def report(title, lat, seconds, srv, first_req):
    n = sum(len(v) for v in lat.values()) + len(first_req)
    print(f"\n{title}: {n} requests in {seconds:.0f} s ({n / seconds:.0f}/s)")
    print(f"  cold start (each client's first request, opening its connection): "
          f"{len(first_req)} requests, p50 {_pct(first_req, 50):.1f} ms, "
          f"max {_pct(first_req, 100):.1f} ms; the steady state:")
    print(f"  {'endpoint':<11} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}   target p99 "
          f"{TARGET_P99_MS:.0f} ms (ratio)   in the server: p50 / p99 ms")
    for k, v in lat.items():
        p99 = _pct(v, 99)
        print(f"  {k:<11} {len(v):>6} {_pct(v, 50):>8.1f} {p99:>8.1f}   "
              f"{p99 / TARGET_P99_MS:.2f}x of the target"
              f"{'':>13}{_pct(srv[k], 50):6.2f} / {_pct(srv[k], 99):6.2f}")


def overview_load(url, password="bench-password-1"):
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium",
                              args=["--headless", "--no-sandbox"])
        page = b.new_page()
        page.goto(url + "/login")
        page.fill("#username", "bench")
        page.fill("#password", password)
        page.click("#login")
        page.wait_for_selector("#count-completed", timeout=120_000)
        for _ in range(3):
            t = time.perf_counter()
            page.goto(url + "/overview")
            page.wait_for_selector("#count-completed", timeout=120_000)
            times.append(time.perf_counter() - t)
        b.close()
    return statistics.median(times), times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--think", type=float, default=0.5)
    ap.add_argument("--groups", type=int, default=10000)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--photometry", type=int, default=100000)
    ap.add_argument("--procs", type=int, default=5, help="client processes")
    ap.add_argument("--port", type=int, default=5077)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args(argv)

    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="contimg-bench-api-"))
    dbp = tmp / "state" / "pipeline.sqlite3"
    t = time.perf_counter()
    info = build_db(dbp, args.groups, args.images, args.photometry)
    print(f"database: {args.groups} groups, {args.images} images, {args.photometry} photometry "
          f"rows ({dbp.stat().st_size / 2**20:.0f} MiB) built in {time.perf_counter() - t:.1f} s")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    srv = subprocess.Popen([sys.executable, "-m", "contimg.cli", "-q", "app", "--db", str(dbp),
                            "--port", str(args.port)], env=env, cwd=tmp,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        import multiprocessing as mp

        import psutil

        sp = psutil.Process(srv.pid)
        stop, done = mp.Event(), mp.Value("i", 0)
        w = mp.Process(target=writer, args=(dbp, stop, done))
        w.start()
        for title, think in ((f"polling: {args.clients} clients, {args.think} s between "
                              "requests", args.think),
                             (f"closed loop: {args.clients} clients, no pause", 0.0)):
            cpu0 = sum(sp.cpu_times()[:2])
            lat, errors, srv_t, first_req = run_load(url, info["token"], info["sources"],
                                                     args.clients, args.procs,
                                                     args.seconds, think)
            report(title, lat, args.seconds, srv_t, first_req)
            cpu = sum(sp.cpu_times()[:2]) - cpu0
            n = sum(len(v) for v in lat.values())
            print(f"  server process: {cpu:.1f} CPU-s in {args.seconds:.0f} s ({cpu / args.seconds:.0%}"
                  f" of a core), {cpu / n * 1e3:.1f} ms CPU per request; machine load "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            if errors:
                print(f"  {len(errors)} errors, e.g. {errors[:3]}")
        stop.set()
        w.join()
        print(f"\nthe writer (the stream's part, its own process) completed {done.value} "
              "groups meanwhile")
        if not args.no_browser:
            med, all_ = overview_load(url)
            print(f"Overview page load in chromium: median {med:.2f} s "
                  f"({', '.join(f'{x:.2f}' for x in all_)})")
    finally:
        srv.terminate()
        srv.wait(10)


if __name__ == "__main__":
    main()
