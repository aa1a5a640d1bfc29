"""Group → Measurement Set on a Dask cluster, each file read where it lives.

One group becomes one task graph: the subband reads (one task chain per file, pinned to
a worker that can see the file) feed one writer task that owns the MS (python-casacore
is not thread-safe, so every table operation of one MS stays in that task's thread).
The writer runs on a worker, streams the blocks in with ``worker_client`` (a few
subbands ahead, so memory follows the chunk), writes to ``<ms>.tmp-<pid>`` and renames.

Placement (which worker may read which file):

* ``placement=None``: discovered — every worker is asked which files it can open;
* ``placement={"worker name, address or host": ["/dir", ...]}``: configured;
* ``placement="any"``: no restriction (one machine, shared disk).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from graphs.convert import chunk_workers, placement_from_directories

log = logging.getLogger(__name__)

# one MS written at a time per process: python-casacore is not thread-safe
_CASACORE_LOCK = threading.Lock()


def _can_open(files):
    import h5py

    ok = []
    for f in files:
        try:
            with h5py.File(f, "r"):
                ok.append(True)
        except OSError:
            ok.append(False)
    return ok


def parse_placement(placement: str):
    """What a ``[stream] placement`` setting means: ``"any"`` -> "any"; ``"discover"`` ->
    None (ask the workers); else a JSON file ``{worker name|address|host: [dirs]}`` ->
    that mapping."""
    if placement in ("any", "discover"):
        return None if placement == "discover" else "any"
    try:
        with open(placement) as fh:
            mapping = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"placement {placement}: neither 'any', 'discover' nor a JSON "
                         "file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"placement {placement}: not valid JSON ({exc})") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"placement {placement}: expected {{worker: [directories]}}")
    return mapping


def discover_placement(client, files) -> dict[str, list[str]]:
    """Ask every worker which of ``files`` it can open; file -> worker addresses."""
    files = [str(f) for f in files]
    seen = client.run(_can_open, files)
    out = {}
    for i, f in enumerate(files):
        addrs = sorted(a for a, ok in seen.items() if ok[i])
        if not addrs:
            raise OSError(f"{f}: no Dask worker can open this file")
        out[f] = addrs
    return out


def resolve_placement(client, files, placement):
    if placement == "any":
        return None
    if placement is None:
        return discover_placement(client, files)
    return placement_from_directories(placement, files, client.scheduler_info()["workers"])


class _Lazy:
    """Carries dask collections into a task unevaluated (distributed would otherwise
    compute collections found in a task's arguments before the task runs, unpinned)."""

    def __init__(self, value):
        self.value = value


def _compute_here(lazy):
    """Runs where the block's file is: read the block and prepare it for the MAIN table
    (conjugation, row reductions), so the writer only copies it into the MS."""
    import dask

    from contimg.io.ms import prepare_ms_block

    names = [n for n, _ in lazy.value]
    values = dask.compute(*(a for _, a in lazy.value), scheduler="sync")
    return prepare_ms_block(dict(zip(names, values, strict=True)))


class _Gathered:
    def __init__(self, client, futures):
        self.client, self.futures = client, futures

    def result(self):
        """The block's numpy values; taken straight from this worker's memory when the
        read ran here (no serialisation), fetched from the other worker otherwise."""
        from distributed import get_worker, wait

        wait(self.futures)
        try:
            data = get_worker().data
            key = self.futures.key
            if self.futures.status == "finished" and key in data:
                return data[key]
        except (ValueError, AttributeError):  # not on a worker
            pass
        return self.client.gather(self.futures)

    def cancel(self):
        self.client.cancel(self.futures)


def _write_task(lazy_ds, ms_path, allowed, overwrite, prefetch, flag_strategy=None):
    """Runs on a worker: stream the group's blocks (reads pinned) into one MS; with a
    flagging strategy, the MS is then flagged in place by :func:`contimg.flagging.flag_ms`
    on bounded baseline blocks (all integrations and channels of a few baselines at a
    time, read back from the MS just written), so neither the writer nor the flagger
    holds the group; a failed flagging removes the MS."""
    import shutil

    from distributed import worker_client

    from contimg.io.ms import single_block, write_ms

    ds = lazy_ds.value
    t0 = time.perf_counter()
    info = {}
    stats = {}
    token = uuid.uuid4().hex[:8]
    labels = [os.path.basename(f).replace(".hdf5", "") if f else "filled"
              for f in ds.attrs["chunk_files"]]
    st = None
    history = [f"contimg convert from {len(ds.attrs['source_files'])} UVH5 files"]
    if flag_strategy is not None:
        from contimg.config import load_flag_strategy

        st = load_flag_strategy(None if flag_strategy is True else flag_strategy)
        info["strategy"] = st.to_dict()
        history.append(f"contimg RFI flags: {json.dumps(info['strategy'])}")
    with worker_client() as client:

        def submit(named, block):
            # One task per block, pinned: the block's whole (small) graph runs inside it
            # on the worker that holds the file, so no read can drift elsewhere.
            ws = allowed[block[1]]
            pin = {} if ws is None else dict(workers=ws, allow_other_workers=False)
            # culled to this block's own tasks before it is sent: the block of a
            # concatenated array still carries the whole group's graph (every file's
            # header arrays), which would be pickled with each read otherwise
            culled = [(n, single_block(a)) for n, a in named]
            fut = client.submit(_compute_here, _Lazy(culled), **pin, pure=False, priority=10,
                                key=f"read-{labels[block[1]]}-t{block[0]}-{token}")
            return _Gathered(client, fut)

        # Writing and flagging both happen while this task is seceded (inside
        # worker_client), and so does every wait for the lock: a task that rejoined the
        # worker's thread pool and then waited for the lock would hold the worker's only
        # slot while the lock's holder waits for reads pinned to that worker (the
        # stream's stall when flagging followed the ``with`` block).
        with _CASACORE_LOCK:
            path = write_ms(ds, ms_path, overwrite=overwrite, submit=submit,
                            prefetch=prefetch, history=history, stats=stats)
            if st is not None:
                from contimg.flagging import flag_ms

                t1 = time.perf_counter()
                try:
                    summ = flag_ms(path, strategy=st, backup=False)
                except BaseException:
                    shutil.rmtree(path, ignore_errors=True)
                    raise
                info["flag_seconds"] = time.perf_counter() - t1
                info["flagged"] = float(summ["after"]["overall"])
                info["_after"] = summ["after"]
    out = dict(ms=path, seconds=time.perf_counter() - t0,
               nbytes=int(ds.VISIBILITY.nbytes + ds.FLAG.nbytes + ds.WEIGHT.nbytes),
               write_s=stats.get("seconds"), wait_s=stats.get("wait_s"))
    if "_after" in info:
        out["flag_summary"] = _write_flag_summary(path, ds, info)
    out.update({k: v for k, v in info.items() if k not in ("strategy", "_after")})
    return out


def _write_flag_summary(ms, ds, info):
    """``<ms>.flag_summary.json``, as ``contimg flag`` writes it (no ``before``: the
    flags were made while the group was converted)."""
    from contimg.flagging import default_summary_path, summary_record, write_flag_summary

    summary = summary_record(ms, ds, info["strategy"], group=ds.attrs.get("group_start"),
                             after=info["_after"], during="conversion",
                             timing_s={"flag": round(info["flag_seconds"], 4)})
    return str(write_flag_summary(summary, default_summary_path(ms)))


#: visibility bytes of one block (one subband file x a time chunk x all baselines) that
#: ``convert_group`` reads and writes at a time: the time chunk adapts to the baselines
#: (a full DSA-110 group: 3 chunks of 8 integrations; 2x the baselines: 6 of 4)
BLOCK_BYTES = 32 << 20


def convert_group(client, files_or_ds, ms_path, *, placement=None, overwrite=False,
                  prefetch=2, key=None, flag=None, **open_kw):
    """Submit the conversion of one group; return a distributed Future of its summary.

    ``files_or_ds``: the group's subband files, or one UVH5 file of any telescope (opened
    by :func:`contimg.io.uvh5.open_any`), or a Dataset.
    ``flag``: RFI-flag while converting (True: the default strategy; or a
    :class:`graphs.flag.FlagStrategy`, mapping or TOML path): once written, the MS is
    flagged in place on bounded baseline blocks (:func:`contimg.flagging.flag_ms`, no
    flag version kept), before the Future completes; the summary then has ``flagged``
    (fraction) and ``flag_seconds``. Use it with ``placement="any"``.
    ``open_kw`` go to :func:`contimg.io.uvh5.open_any` (``n_subbands``,
    ``allow_missing``...: for groups; ``chunks`` defaults to blocks of at most
    :data:`BLOCK_BYTES` of visibilities, see :func:`contimg.io.uvh5.open_group`). The Future's result is ``{"ms", "seconds", "nbytes"}``;
    bad input raises :class:`contimg.io.uvh5.UVH5Error` here (headers are read now)
    or from the Future (data read later), and never leaves anything at ``ms_path``.
    """
    from contimg.io.uvh5 import open_any

    if not hasattr(files_or_ds, "data_vars") and open_kw.get("chunks") is None:
        # blocks of bounded bytes whatever the number of baselines: a block is one
        # subband x a time chunk x all baselines, and the writer holds prefetch + 1 of
        # them (and each read a few copies while it is prepared)
        open_kw["chunks"] = {"block_bytes": BLOCK_BYTES}
    ds = files_or_ds if hasattr(files_or_ds, "data_vars") else open_any(files_or_ds,
                                                                        **open_kw)
    ds = flag_nonfinite(ds)
    if flag not in (None, False) and placement != "any":
        raise ValueError("flagging during conversion reads files from any worker: use "
                         "placement='any', or flag the MS afterwards (contimg flag)")
    files = [f for f in ds.attrs["chunk_files"] if f]
    place = resolve_placement(client, files, placement)
    allowed = chunk_workers(ds, place)
    stamp = ds.attrs.get("group_start", os.path.basename(str(ms_path)))
    key = key or f"write-ms-{stamp}-{time.time_ns()}"
    return client.submit(_write_task, _Lazy(ds), os.path.abspath(str(ms_path)), allowed,
                         overwrite, prefetch, None if flag is False else flag, key=key,
                         pure=False)


def flag_nonfinite(ds):
    """NaN/inf visibilities (a correlator fault) flagged, and zeroed so that no later
    sum (flagger statistics, solver, gridder) meets them; lazy, elementwise (same
    chunks: each block's read still happens once)."""
    import dask.array as da

    vis = ds.VISIBILITY.data
    bad = ~da.isfinite(vis)
    dims = ds.VISIBILITY.dims
    return ds.assign(VISIBILITY=(dims, da.where(bad, vis.dtype.type(0), vis)),
                     FLAG=(ds.FLAG.dims, ds.FLAG.data | bad))


@dataclass
class ConvertReport:
    done: list = field(default_factory=list)     # (stamp, summary)
    failed: list = field(default_factory=list)   # (stamp, error text)


def convert_many(client, groups, out_dir, *, placement=None, overwrite=False,
                 in_flight=2, progress=None, **open_kw) -> ConvertReport:
    """Convert several groups (lists of files; a single UVH5 file of any telescope is a
    group of one), ``in_flight`` at a time. A DSA-110 group becomes
    ``<earliest timestamp>.ms``, another file ``<its stem>.ms``."""
    from distributed import as_completed

    from contimg.io.uvh5 import product_stem

    os.makedirs(out_dir, exist_ok=True)
    report = ConvertReport()
    todo = list(groups)
    running = {}
    ac = as_completed()

    def start_next():
        while todo and len(running) < in_flight:
            files = todo.pop(0)
            try:   # a group: its earliest file-name timestamp; one file: its stem
                stamp = product_stem(files)
            except ValueError as exc:
                report.failed.append((os.path.basename(str(files[0])), str(exc)))
                if progress:
                    progress(os.path.basename(str(files[0])), None, str(exc))
                continue
            try:
                fut = convert_group(client, files, os.path.join(out_dir, f"{stamp}.ms"),
                                    placement=placement, overwrite=overwrite, **open_kw)
            except (ValueError, OSError) as exc:
                report.failed.append((stamp, str(exc)))
                if progress:
                    progress(stamp, None, str(exc))
                continue
            running[fut.key] = stamp
            ac.add(fut)

    start_next()
    while running:
        fut = next(ac)
        stamp = running.pop(fut.key)
        try:
            summary = fut.result()
            report.done.append((stamp, summary))
            if progress:
                progress(stamp, summary, None)
        except Exception as exc:  # noqa: BLE001 - reported per group, others go on
            report.failed.append((stamp, f"{type(exc).__name__}: {exc}"))
            if progress:
                progress(stamp, None, str(exc))
        start_next()
    return report
