"""The Cluster page: the Dask scheduler the stream uses, seen from the app.

One asynchronous ``distributed.Client`` per server (on the app's event loop, so a
refresh never blocks a page); every few seconds it asks the scheduler for its workers
(memory, CPU, threads), the tasks processing on each worker and the task counts by
state. Stage tasks carry readable keys (``<stage>-<group>-a<attempt>-<ns>``, see
:func:`contimg.pipeline.stage_key`), so the page says which groups are in flight on
which worker. Below, the per-stage timings over the completed groups (the database's
wall seconds and, with ``[dask] task_log``, the CPU seconds per group from the workers' own
task records: :func:`contimg.cluster.stage_table`, what ``contimg status`` prints),
refreshed every :data:`TIMINGS_EVERY` updates.
"""

from __future__ import annotations

import html
import logging
import re

import pandas as pd
import panel as pn

log = logging.getLogger(__name__)

STAGE_KEY = re.compile(r"^(?P<stage>[a-z_]+)-(?P<group>\d{4}-\d\d-\d\dT[\d:]+)-a(?P<a>\d+)")
_clients: dict = {}
TIMINGS_EVERY = 10        # updates (of 3 s) between two readings of the task records


def _task_counts(dask_scheduler=None):
    from collections import Counter

    c = Counter(ts.state for ts in dask_scheduler.tasks.values())
    return dict(c)


async def snapshot(address: str) -> dict:
    """Workers, their tasks and the scheduler's task counts (an async Client per
    address, made on first use)."""
    from distributed import Client

    client = _clients.get(address)
    if client is None or client.status not in ("running", "connecting"):
        # not the process's default client: nothing else here may compute on it
        client = await Client(address, asynchronous=True, timeout=5, set_as_default=False)
        _clients[address] = client
    ident = await client.scheduler.identity()
    processing = await client.scheduler.processing()
    counts = await client.run_on_scheduler(_task_counts)
    workers = []
    inflight = []
    for addr, w in ident.get("workers", {}).items():
        m = w.get("metrics", {})
        keys = [str(k) for k in processing.get(addr, [])]
        for k in keys:
            mt = STAGE_KEY.match(k)
            if mt:
                inflight.append({"group": mt["group"], "stage": mt["stage"],
                                 "attempt": int(mt["a"]), "worker": w.get("name", addr),
                                 "key": k})
        workers.append({"worker": str(w.get("name", addr)), "address": addr,
                        "threads": w.get("nthreads"),
                        "memory_GiB": round(m.get("memory", 0) / 2**30, 2),
                        "memory_limit_GiB": round((w.get("memory_limit") or 0) / 2**30, 2),
                        "cpu_pct": m.get("cpu"), "processing": len(keys),
                        "tasks": ", ".join(keys[:5])})
    dash = ident.get("services", {}).get("dashboard")
    host = re.sub(r"^\w+://", "", address).rsplit(":", 1)[0]
    return {"address": address, "workers": workers, "inflight": inflight,
            "counts": counts,
            "dashboard": f"http://{host}:{dash}" if dash else None}


class ClusterView:
    def __init__(self, ctx):
        self.ctx = ctx
        self.head = pn.pane.HTML(sizing_mode="stretch_width")
        self.workers = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=False,
                                            sizing_mode="stretch_width", height=220)
        self.inflight = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=False,
                                             sizing_mode="stretch_width", height=220)
        self.timings = pn.pane.HTML(sizing_mode="stretch_width")
        self._n = 0

    def update_timings(self):
        """The per-stage table (database wall seconds, workers' CPU seconds per group)."""
        from contimg.cluster import stage_table

        lines = stage_table(self.ctx.db, self.ctx.task_log or None)
        self.timings.object = (f'<pre id="stage-timings">{html.escape(chr(10).join(lines))}'
                               "</pre>" if lines else "<p>No completed group yet.</p>")

    async def update(self):
        if self._n % TIMINGS_EVERY == 0:
            self.update_timings()
        self._n += 1
        if not self.ctx.scheduler:
            self.head.object = ("<p>No Dask scheduler configured: start the app with "
                                "<code>--scheduler tcp://HOST:8786</code> (the stream's).</p>")
            return
        try:
            s = await snapshot(self.ctx.scheduler)
        except (OSError, TimeoutError) as exc:
            self.head.object = (f"<p>Dask scheduler {html.escape(self.ctx.scheduler)} is not "
                                f"reachable: {html.escape(str(exc))}</p>")
            return
        dash = self.ctx.dashboard_url or s["dashboard"]
        links = " · ".join(f'<a href="{dash}/{p}" target="_blank">{t}</a>' for p, t in (
            ("status", "task stream / progress"), ("workers", "workers"),
            ("tasks", "task stream"), ("graph", "graph"))) if dash else "no dashboard"
        counts = ", ".join(f"{k} {v}" for k, v in sorted(s["counts"].items())) or "idle"
        self.head.object = (f'<p id="scheduler">Scheduler <b>{html.escape(s["address"])}</b>: '
                            f'{len(s["workers"])} worker(s); tasks: {html.escape(counts)}</p>'
                            f"<p>Dask dashboard: {links}</p>")
        self.workers.value = pd.DataFrame(s["workers"])
        self.inflight.value = pd.DataFrame(s["inflight"] or
                                           {"group": [], "stage": [], "worker": []})

    def panel(self):
        pn.state.onload(lambda: pn.state.execute(self.update))
        pn.state.add_periodic_callback(self.update, period=3000)
        return pn.Column(self.head, "#### Workers", self.workers,
                         "#### Groups in flight (stage tasks by worker)", self.inflight,
                         "#### Per-stage timings (completed groups)", self.timings,
                         sizing_mode="stretch_width")
