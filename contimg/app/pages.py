"""The Panel pages of the operator app. Each page is a function of the app context and
the logged-in user; it reads through :mod:`contimg.app.queries` and refreshes itself
with a periodic callback (no reload). Files (FITS, CASA tables) are read off the event
loop, decimated to what a screen shows."""

from __future__ import annotations

import asyncio
import datetime as _dt
import html
import logging

import numpy as np
import pandas as pd
import panel as pn

from contimg.app import queries as q
from contimg.app.api import ApiError, reprocess
from contimg.app.products import VIEW_PX, calibration_frames, decimate, read_plane, stretch

log = logging.getLogger(__name__)

REFRESH_MS = 5000
TITLES = {"overview": "Overview", "groups": "Groups", "calibration": "Calibration",
          "images": "Images", "sources": "Sources", "cluster": "Cluster"}


def _iso(t):
    if t is None or (isinstance(t, float) and np.isnan(t)):
        return ""
    return _dt.datetime.fromtimestamp(float(t), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _header(page, user):
    links = " ".join(
        f'<a href="/{p}" style="margin-right:14px;{"font-weight:bold;" if p == page else ""}"'
        f' id="nav-{p}">{t}</a>' for p, t in TITLES.items())
    return pn.pane.HTML(
        f'<div style="display:flex;gap:10px;align-items:center;width:100%">'
        f'<b style="margin-right:24px">contimg</b>{links}<span style="margin-left:auto">'
        f'<span id="whoami">{html.escape(user.name)} ({user.role})</span> · '
        f'<a href="/logout">log out</a></span></div>', sizing_mode="stretch_width")


def build(page: str, ctx):
    """The page ``page`` for the user of this Bokeh session."""
    user = ctx.user_from_cookies(pn.state.cookies or {})
    if user is None:   # the auth provider redirects first; this guards the websocket
        return pn.pane.Markdown("Not logged in: [log in](/login)")
    body = globals()[f"_{page}"](ctx, user)
    pn.state.curdoc.title = f"contimg · {TITLES[page]}"
    return pn.Column(_header(page, user), pn.pane.Markdown(f"## {TITLES[page]}"), body,
                     sizing_mode="stretch_width")


def _every(fn, period=REFRESH_MS):
    fn()
    pn.state.add_periodic_callback(fn, period=period)


# ------------------------------------------------------------------ overview
def _overview(ctx, user):
    import hvplot.pandas  # noqa: F401  (registers .hvplot)

    queue = pn.pane.HTML(sizing_mode="stretch_width")
    thr = pn.pane.HoloViews(sizing_mode="stretch_width", height=260)
    lat = pn.pane.HoloViews(sizing_mode="stretch_width", height=260)
    fails = pn.pane.HTML(sizing_mode="stretch_width")
    newest = pn.pane.HTML(width=280)
    recent = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=False,
                                  sizing_mode="stretch_width", height=260)

    def update():
        s = q.status(ctx.db, ctx.products)
        cells = "".join(f'<td style="padding:6px 16px;text-align:center"><div style="font-size:'
                        f'26px" id="count-{k}">{v}</div>{k}</td>' for k, v in s["counts"].items())
        disk = s["disk"]
        dtxt = (f"products disk: {disk['used'] / 2**30:.1f} of {disk['total'] / 2**30:.1f} GiB "
                f"used, {disk['free'] / 2**30:.1f} GiB free; MS {s['ms_bytes'] / 2**30:.2f} GiB"
                if disk else "products directory not configured")
        queue.object = (f'<table id="queue"><tr>{cells}</tr></table><p>{s["completed_last_hour"]}'
                        f" group(s) completed in the last hour (telescope: 12/hour). {dtxt}</p>")
        t = q.throughput(ctx.db, 24)
        df = pd.DataFrame({"hours_ago": t["hours_ago"], "groups": t["per_hour"]})
        thr.object = (df.hvplot.bar(x="hours_ago", y="groups", title="groups completed per hour",
                                    xlabel="hours ago", ylabel="groups")
                      * __import__("holoviews").HLine(12).opts(color="red", line_dash="dashed"))
        ldf = pd.DataFrame(t["latency"] or {"finished_at": [], "latency_s": []})
        ldf["finished"] = pd.to_datetime(ldf["finished_at"], unit="s")
        lat.object = ldf.hvplot.scatter(x="finished", y="latency_s",
                                        title="end-to-end latency per group (24 h)",
                                        ylabel="latency (s)")
        fails.object = "<h4>Recent failures</h4>" + ("".join(
            f"<div><b>{html.escape(f['group_id'])}</b>: {html.escape((f['error'] or '')[:300])}"
            "</div>" for f in s["recent_failures"]) or "<div>none</div>")
        im = s["newest_image"]
        newest.object = ("<h4>Newest image</h4>" + (
            f'<a href="/images?image={im["id"]}"><img id="newest-thumb" width="256" '
            f'src="/api/images/{im["id"]}/thumbnail"></a><div>{html.escape(im["group_id"] or "")}'
            "</div>" if im else "<div>no image yet</div>"))
        g = pd.DataFrame(q.groups(ctx.db, limit=20))
        if len(g):
            g = g[["group_id", "state", "attempts", "n_present", "flagged_fraction", "calset"]]
        recent.value = g

    _every(update)
    return pn.Column(queue, pn.Row(thr, lat, sizing_mode="stretch_width"),
                     pn.Row(pn.Column("#### Recent groups", recent, sizing_mode="stretch_width"),
                            newest, sizing_mode="stretch_width"), fails,
                     sizing_mode="stretch_width")


# ------------------------------------------------------------------ groups
def _groups_frame(ctx, state):
    rows = q.groups(ctx.db, state=state or None, limit=2000)
    stages = ["convert", "flag", "calibrate", "apply", "image", "total"]
    out = []
    for r in rows:
        d = {k: r[k] for k in ("group_id", "state", "attempts", "retries", "n_present",
                               "flagged_fraction", "calset")}
        d["image"] = (f'<a href="/images?image={r["image_id"]}">image {r["image_id"]}</a>'
                      if r["image_id"] else "")
        for s in stages:
            v = r["stages"].get(s)
            d[f"{s}_s"] = round(v, 1) if isinstance(v, float) else v
        out.append(d)
    return pd.DataFrame(out)


def _groups(ctx, user):
    import hvplot.pandas  # noqa: F401

    state = pn.widgets.Select(label="state", options=[""] + list(q.GROUP_STATES), value="",
                              width=160)
    table = pn.widgets.Tabulator(_groups_frame(ctx, ""), disabled=True, show_index=False,
                                 header_filters=True, selectable=1, pagination="remote",
                                 page_size=15, sizing_mode="stretch_width", height=480,
                                 formatters={"image": "html"})
    detail = pn.Column(pn.pane.Markdown("Select a group to see its events and timings."),
                       sizing_mode="stretch_width")
    selected = {"gid": None, "state": None, "msg": ""}

    def show(gid):
        selected["gid"] = gid
        try:
            g = q.group(ctx.db, gid)
        except q.NotFound:
            detail.objects = [pn.pane.Markdown(f"group {gid} is gone")]
            return
        selected["state"] = g["state"]
        ev = pd.DataFrame(g["events"])
        if len(ev):
            ev["at"] = ev["at"].map(_iso)
            ev = ev[["at", "from_state", "to_state", "owner", "reason"]]
        tm = pd.DataFrame([t for t in g["timings"] if t["attempt"] == g["attempts"]
                           and t["stage"] != "total" and t["seconds"] is not None])
        bars = (tm.hvplot.barh(x="stage", y="seconds", title="stage timings (this attempt)",
                               height=220, width=500) if len(tm) else pn.pane.Markdown(
            "no stage timings yet"))
        info = pn.pane.HTML(
            f'<h3 id="group-detail">{html.escape(gid)}</h3><div>State: <b id="group-state">'
            f'{g["state"]}</b> · attempts {g["attempts"]} · subbands {g["n_present"]}/'
            f'{g["n_expected"]}</div>' + (f'<div>error: {html.escape(g["error"] or "")}</div>'
                                          if g["error"] and g["state"] == "failed" else "")
            + "".join(f'<div><a href="/images?image={i["id"]}">image {i["id"]}</a></div>'
                      for i in g["images"]))
        items = [info]
        if user.can("operator"):
            button = pn.widgets.Button(label="Reprocess", button_type="warning", width=140,
                                       disabled=g["state"] not in ("completed", "failed"))
            button.on_click(lambda e: do_reprocess(gid))
            items.append(pn.Row(button, pn.pane.HTML(
                f'<span id="reprocess-msg">{html.escape(selected["msg"])}</span>'
                if selected["msg"] else "")))
        detail.objects = items + [bars, pn.widgets.Tabulator(
            ev, disabled=True, show_index=False, sizing_mode="stretch_width", height=240)]

    def do_reprocess(gid):
        try:
            r = reprocess(ctx.db, gid, user)
            selected["msg"] = f"{gid} is {r['state']}"
        except (ApiError, q.NotFound) as exc:
            selected["msg"] = getattr(exc, "message", str(exc))
        show(gid)
        refresh()

    def on_select(event):
        if event.new:
            gid = table.value.iloc[event.new[0]]["group_id"]
            if gid != selected["gid"]:
                selected["msg"] = ""
                show(gid)

    def refresh(*_):
        df = _groups_frame(ctx, state.value)
        table.value = df
        gid = selected["gid"]
        if gid:
            rows = df.index[df["group_id"] == gid].tolist()
            if rows and table.selection != rows[:1]:
                table.selection = rows[:1]
            g = ctx.db.group(gid)
            if g is not None and g["state"] != selected["state"]:
                show(gid)   # the detail follows the group's state

    table.param.watch(on_select, "selection")
    state.param.watch(refresh, "value")
    pn.state.add_periodic_callback(refresh, period=REFRESH_MS)
    return pn.Column(state, table, detail, sizing_mode="stretch_width")


# ------------------------------------------------------------------ calibration
def _calibration(ctx, user):
    import holoviews as hv
    import hvplot.pandas  # noqa: F401

    sets = q.calibration_sets(ctx.db)
    df = pd.DataFrame([{"id": s["id"], "name": s["name"], "status": s["status"],
                        "calibrator": s["calibrator"], "transit": _iso(s["t_transit"]),
                        "valid_from": _iso(s["valid_start"]), "valid_to": _iso(s["valid_end"]),
                        "refant": s["refant"], "groups_using": s["n_groups"],
                        "used_by": ", ".join(s["groups"][:3])
                        + (" …" if s["n_groups"] > 3 else ""),
                        "reason": s["reason"]} for s in sets])
    table = pn.widgets.Tabulator(df, disabled=True, show_index=False, selectable=1,
                                 sizing_mode="stretch_width", height=200)
    if sets:
        seg = pd.DataFrame([{"name": s["name"], "status": s["status"],
                             "start": pd.to_datetime(s["valid_start"] or s["t_transit"], unit="s"),
                             "end": pd.to_datetime(s["valid_end"] or s["t_transit"], unit="s")}
                            for s in sets])
        timeline = hv.Segments(seg, kdims=["start", "name", "end", "name"],
                               vdims=["status"]).opts(
            color="status", cmap={"valid": "green", "rejected": "red"}, line_width=8,
            height=60 + 30 * len(sets), responsive=True, title="validity windows",
            tools=["hover"])
        # the pane reserves the plot's height before Bokeh draws it, so the table
        # below does not move under an operator's click while the page is loading
        timeline = pn.pane.HoloViews(timeline, height=60 + 30 * len(sets),
                                     sizing_mode="stretch_width")
    else:
        timeline = pn.pane.Markdown("no calibration sets in the database yet")
    plots = pn.Column(pn.pane.Markdown("Select a calibration set to plot its solutions."),
                      sizing_mode="stretch_width")
    names = {s["name"]: s for s in sets}

    async def show(name):
        s = names[name]
        plots.objects = [pn.pane.Markdown(f"reading the tables of {name} …")]
        try:
            fr = await asyncio.to_thread(calibration_frames, s["tables"])
        except Exception as exc:   # a broken table must not take the page down
            plots.objects = [pn.pane.Markdown(f"cannot read the tables of {name}: {exc}")]
            return
        out = [pn.pane.HTML(f'<h3 id="calset-title">{html.escape(name)}</h3>')]
        if s["status"] == "rejected":
            out.append(pn.pane.Markdown(f"**rejected**: {s['reason']}"))
        if "bandpass" in fr:
            b = fr["bandpass"][~fr["bandpass"]["flag"]]
            kw = dict(x="freq_mhz", by="antenna", groupby="pol", legend=False, height=300,
                      responsive=True, xlabel="frequency (MHz)")
            out += [pn.pane.HTML('<h4 id="bandpass-plot">Bandpass</h4>'),
                    pn.Row(b.hvplot.line(y="amp", title="bandpass amplitude", **kw),
                           b.hvplot.line(y="phase_deg", title="bandpass phase (deg)", **kw),
                           sizing_mode="stretch_width"),
                    b.hvplot.scatter(x="freq_mhz", y="snr", by="pol", height=220,
                                     responsive=True, title="bandpass SNR"),
                    pn.pane.Markdown(f"flagged solutions: {fr['bandpass']['flag'].mean():.1%}")]
        if "gain" in fr:
            g = fr["gain"][~fr["gain"]["flag"]]
            kw = dict(x="time", by="antenna", groupby="pol", legend=False, height=300,
                      responsive=True)
            out += [pn.pane.HTML('<h4 id="gain-plot">Gains</h4>'),
                    pn.Row(g.hvplot.line(y="amp", title="gain amplitude", **kw),
                           g.hvplot.line(y="phase_deg", title="gain phase (deg)", **kw),
                           sizing_mode="stretch_width"),
                    pn.pane.Markdown(f"flagged solutions: {fr['gain']['flag'].mean():.1%}")]
        if len(out) == 1:
            out.append(pn.pane.Markdown("no readable tables in this set"))
        plots.objects = out

    async def on_select(event):
        if event.new:
            await show(table.value.iloc[event.new[0]]["name"])

    table.param.watch(on_select, "selection")
    return pn.Column(timeline, table, plots, sizing_mode="stretch_width")


# ------------------------------------------------------------------ images
def _images_frame(ctx):
    rows = q.images(ctx.db, limit=500)
    return pd.DataFrame([{
        "id": r["id"], "thumbnail": (f'<img src="/api/images/{r["id"]}/thumbnail" height="64">'
                                     if r["qa"].get("thumbnail") else ""),
        "group_id": r["group_id"], "noise_mJy": None if r["noise_jy"] is None
        else round(r["noise_jy"] * 1e3, 3), "peak_Jy": r["peak_jy"],
        "dynamic_range": round(r["qa"].get("dynamic_range") or 0, 1),
        "beam": ("{:.1f}\"x{:.1f}\"".format(r["beam"].get("bmaj_arcsec", 0),
                                            r["beam"].get("bmin_arcsec", 0))
                 if isinstance(r["beam"], dict) else ""),
        "components": r["qa"].get("n_components"), "created": _iso(r["created_at"]),
        "fits": f'<a href="/api/images/{r["id"]}/fits" download>FITS</a>'} for r in rows])


def _viewer_data(path, sources):
    data, wcs = read_plane(path)
    small, step = decimate(data, VIEW_PX)
    ny, nx = small.shape
    ys, xs = np.mgrid[0:ny, 0:nx]
    ra, dec = wcs.pixel_to_world_values(xs * step + (step - 1) / 2, ys * step + (step - 1) / 2)
    cat = []
    if sources:
        sra = np.array([s["ra_deg"] for s in sources])
        sdec = np.array([s["dec_deg"] for s in sources])
        px, py = wcs.world_to_pixel_values(sra, sdec)
        ok = (px >= 0) & (px < data.shape[1]) & (py >= 0) & (py < data.shape[0])
        cat = [(float(x) / step, float(y) / step, s["name"]) for x, y, s, k
               in zip(px, py, sources, ok) if k]
    return small, ra, dec, cat


def _images(ctx, user):
    import holoviews as hv

    table = pn.widgets.Tabulator(_images_frame(ctx), disabled=True, show_index=False,
                                 selectable=1, formatters={"thumbnail": "html", "fits": "html"},
                                 sizing_mode="stretch_width", height=300, row_height=70)
    cmap = pn.widgets.Select(label="colour map", options=["gray", "viridis", "inferno"],
                             value="inferno", width=140)
    scale = pn.widgets.Select(label="stretch", options=["asinh", "linear"], value="asinh",
                              width=120)
    view = pn.Column(pn.pane.Markdown("Select an image to open it in the viewer."),
                     sizing_mode="stretch_width")
    cur = {}

    def render():
        small, ra, dec, cat = cur["data"]
        z = stretch(small) if scale.value == "asinh" else np.nan_to_num(small)
        ny, nx = small.shape
        img = hv.Image((np.arange(nx), np.arange(ny), z, ra, dec),
                       kdims=["x", "y"], vdims=["value", "RA_deg", "Dec_deg"]).opts(
            cmap=cmap.value, tools=["hover", "wheel_zoom", "pan"], active_tools=["wheel_zoom"],
            frame_width=600, data_aspect=1, colorbar=True, title=cur["title"],
            xlabel="x (pixel; hover: RA, Dec)", ylabel="y (pixel)")
        pts = hv.Points([(x, y, n) for x, y, n in cat], vdims=["name"]).opts(
            marker="circle", fill_alpha=0, line_color="cyan", size=14, tools=["hover"])
        im = cur["row"]
        view.objects = [
            pn.pane.HTML(f'<h3 id="viewer-title">{html.escape(cur["title"])}</h3>'
                         f'<a id="fits-download" href="/api/images/{im["id"]}/fits" download>'
                         f'download FITS</a> · <span id="viewer-sources">{len(cat)} catalogue source(s) '
                         'overlaid</span>'),
            pn.Row(cmap, scale), pn.pane.HoloViews(img * pts)]

    async def open_image(image_id):
        try:
            im = q.image(ctx.db, image_id)
        except (q.NotFound, q.BadParameter) as exc:
            view.objects = [pn.pane.Markdown(str(exc))]
            return
        view.objects = [pn.pane.Markdown(f"opening image {image_id} …")]
        srcs = q.sources(ctx.db, limit=q.MAX_LIMIT)
        try:
            cur["data"] = await asyncio.to_thread(_viewer_data, im["path"], srcs)
        except (OSError, ValueError) as exc:
            view.objects = [pn.pane.Markdown(f"cannot open {im['path']}: {exc}")]
            return
        cur["row"], cur["title"] = im, f"image {im['id']}: {im['group_id'] or im['path']}"
        render()

    async def on_select(event):
        if event.new:
            await open_image(int(table.value.iloc[event.new[0]]["id"]))

    table.param.watch(on_select, "selection")
    cmap.param.watch(lambda e: cur and render(), "value")
    scale.param.watch(lambda e: cur and render(), "value")
    first = pn.state.session_args.get("image")
    if first:
        async def open_first():
            await open_image(first[0].decode())

        pn.state.onload(open_first)
    pn.state.add_periodic_callback(lambda: setattr(table, "value", _images_frame(ctx)),
                                   period=4 * REFRESH_MS)
    return pn.Column(table, view, sizing_mode="stretch_width")


# ------------------------------------------------------------------ sources
def _sources(ctx, user):
    import hvplot.pandas  # noqa: F401

    inv = pn.pane.HTML(sizing_mode="stretch_width")
    table = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=False, selectable=1,
                                 header_filters=True, pagination="remote", page_size=20,
                                 sizing_mode="stretch_width", height=400)
    lc = pn.Column(sizing_mode="stretch_width")
    ese = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=False,
                               sizing_mode="stretch_width", height=200)

    def update():
        i = q.science_inventory(ctx.db)
        have = ", ".join(f"{k}: {v}" for k, v in i["have"].items())
        miss = ("<p id='science-missing'>Not in this database yet: " + ", ".join(i["missing"])
                + " (variability metrics and ESE candidates come with the science products)."
                "</p>") if i["missing"] else ""
        inv.object = f"<p id='science-have'>In the database: {have}.</p>{miss}"
        table.value = pd.DataFrame(q.sources(ctx.db))
        c = q.ese_candidates(ctx.db, limit=200)["candidates"]
        cols = ["source_id", "preset", "score", "depth_jy", "depth_sigma", "n_epochs", "status"]
        ese.value = pd.DataFrame([{k: r.get(k) for k in cols} for r in c], columns=cols)

    def on_select(event):
        if not event.new:
            return
        d = q.lightcurve(ctx.db, int(table.value.iloc[event.new[0]]["id"]))
        pts = pd.DataFrame(d["points"])
        if not len(pts):
            lc.objects = [pn.pane.Markdown(f"{d['source']['name']}: no photometry yet")]
            return
        pts["time"] = pd.to_datetime(pts["t_mid"], unit="s")
        lc.objects = [pts.hvplot.scatter(x="time", y="flux_jy", title=d["source"]["name"],
                                         height=300, responsive=True)
                      * pts.hvplot.errorbars(x="time", y="flux_jy", yerr1="err_jy")]

    table.param.watch(on_select, "selection")
    _every(update, 4 * REFRESH_MS)
    return pn.Column(inv, table, lc, "#### ESE candidates (best first)", ese,
                     sizing_mode="stretch_width")


# ------------------------------------------------------------------ cluster
def _cluster(ctx, user):
    from contimg.app.cluster import ClusterView

    return ClusterView(ctx).panel()
