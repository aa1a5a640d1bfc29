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


def _compute_raw(lazy):
    """Runs where the block's file is: read the block's variables (contract layout)."""
    import dask

    names = [n for n, _ in lazy.value]
    values = dask.compute(*(a for _, a in lazy.value), scheduler="sync")
    return dict(zip(names, values, strict=True))


def _prepare_shared(raw, columns, extra):
    """A writer's block from a shared read: ``columns`` maps MS column -> variable of
    ``raw``; ``extra`` (lazy) are the block's other columns (e.g. UVW), computed here."""
    import dask

    from contimg.io.ms import prepare_ms_block

    vals = {col: raw[var] for col, var in columns.items()}
    if extra.value:
        names = [n for n, _ in extra.value]
        got = dask.compute(*(a for _, a in extra.value), scheduler="sync")
        vals.update(zip(names, got, strict=True))
    return prepare_ms_block(vals)   # never writes into raw: the flagger shares it


def _pick(raw, var):
    return raw[var]


class _SharedReads:
    """One read per block of VISIBILITY, FLAG and WEIGHT, for both the MS writer and
    the flagging graph (which would otherwise read every file a second time: ~18 CPU-s
    per DSA-110 group). Reads are submitted at once, pinned like the writer's own."""

    VARS = ("VISIBILITY", "FLAG", "WEIGHT")

    def __init__(self, client, ds, allowed, labels, token):
        from contimg.io.ms import single_block

        self.client, self.ds = client, ds
        nt, nb, nf, npol = ds.VISIBILITY.data.numblocks
        if nb != 1 or npol != 1:
            raise ValueError("shared reads need whole baselines and polarizations per block")
        self.futs, self.names = {}, {}
        for ti in range(nt):
            for fi in range(nf):
                named = []
                for var in self.VARS:
                    blk = ds[var].data.blocks[ti, 0, fi, 0]
                    self.names[blk.name] = (ti, fi, var)
                    named.append((var, single_block(blk)))
                ws = allowed[fi]
                pin = {} if ws is None else dict(workers=ws, allow_other_workers=False)
                self.futs[ti, fi] = client.submit(
                    _compute_raw, _Lazy(named), **pin, pure=False, priority=10,
                    key=f"read-{labels[fi]}-t{ti}-{token}")

    def dataset(self):
        """``ds`` with VISIBILITY and FLAG made of the shared reads."""
        import dask
        import dask.array as da

        out = {}
        for var in ("VISIBILITY", "FLAG"):
            src = self.ds[var].data
            tch, _, fch, _ = src.chunks
            # nested lists: time, baseline (one), frequency, polarization (one)
            grid = [[[[da.from_delayed(
                dask.delayed(_pick, pure=True)(self.futs[ti, fi], var),
                shape=(nt, src.shape[1], nf, src.shape[3]), dtype=src.dtype)]
                for fi, nf in enumerate(fch)]] for ti, nt in enumerate(tch)]
            out[var] = (self.ds[var].dims, da.block(grid))
        return self.ds.assign(**out)

    def prepared(self, named, block):
        """The writer's block from the shared read, or None when a column is not one
        of the shared variables' blocks (the writer then reads it itself)."""
        columns, extra = {}, []
        for col, arr in named:
            hit = self.names.get(getattr(arr, "name", None))
            if hit is not None and hit[:2] == tuple(block):
                columns[col] = hit[2]
            elif col == "UVW":
                extra.append((col, arr))
            else:
                return None
        fut = self.client.submit(_prepare_shared, self.futs[tuple(block)], columns,
                                 _Lazy(extra), pure=False, priority=10,
                                 key=f"prepare-t{block[0]}-f{block[1]}-{uuid.uuid4().hex[:8]}")
        return _Gathered(self.client, fut)


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
    flagging strategy, the flagging graph runs on the cluster meanwhile and the MS gets
    its final flags (no second pass over the MS)."""
    from distributed import worker_client

    from contimg.io.ms import single_block, write_ms

    ds = lazy_ds.value
    t0 = time.perf_counter()
    info = {}
    stats = {}
    token = uuid.uuid4().hex[:8]
    labels = [os.path.basename(f).replace(".hdf5", "") if f else "filled"
              for f in ds.attrs["chunk_files"]]
    with worker_client() as client:
        shared = None
        if flag_strategy is not None:
            # the flagger and the writer share one read of every block
            shared = _SharedReads(client, ds, allowed, labels, token)

        def submit(named, block):
            if shared is not None:
                handle = shared.prepared(named, block)
                if handle is not None:
                    return handle
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

        flags = None
        history = [f"contimg convert from {len(ds.attrs['source_files'])} UVH5 files"]
        if flag_strategy is not None:
            flags = _flag_future(client, shared.dataset(), flag_strategy, info)
            history.append(f"contimg RFI flags: {json.dumps(info['strategy'])}")
        with _CASACORE_LOCK:
            path = write_ms(ds, ms_path, overwrite=overwrite, submit=submit,
                            prefetch=prefetch, history=history, flags=flags,
                            stats=stats)
    out = dict(ms=path, seconds=time.perf_counter() - t0,
               nbytes=int(ds.VISIBILITY.nbytes + ds.FLAG.nbytes + ds.WEIGHT.nbytes),
               write_s=stats.get("seconds"), wait_s=stats.get("wait_s"))
    if "_after" in info:
        out["flag_summary"] = _write_flag_summary(path, ds, info)
    out.update({k: v for k, v in info.items() if k not in ("strategy", "_after")})
    return out


def _write_flag_summary(ms, ds, info):
    """``<ms>.flag_summary.json``, as ``contimg flag`` writes it (no ``before``: the
    flags were made while the MS was written)."""
    from contimg.flagging import default_summary_path, summary_record, write_flag_summary

    summary = summary_record(ms, ds, info["strategy"], group=ds.attrs.get("group_start"),
                             after=info["_after"], during="conversion",
                             timing_s={"flag": round(info["flag_seconds"], 4)})
    return str(write_flag_summary(summary, default_summary_path(ms)))


def _flag_future(client, ds, flag_strategy, info):
    """Start the flagging graph of ``ds`` on the cluster (below the reads in priority);
    return the callable ``write_ms(flags=...)`` calls for the final FLAG cube."""
    import dask

    from contimg.config import load_flag_strategy
    from graphs.flag import flag_dataset

    st = load_flag_strategy(None if flag_strategy is True else flag_strategy)
    info["strategy"] = st.to_dict()
    t0 = time.perf_counter()
    with dask.config.set({"array.rechunk.method": "tasks"}):
        new = flag_dataset(ds, st)["FLAG"].data
    fut = client.compute(new, priority=-10)

    def result():
        from contimg.flagging import summary_part
        from graphs.flag import flag_summary_of_cube

        cube = fut.result()
        info["flag_seconds"] = time.perf_counter() - t0
        fs = flag_summary_of_cube(ds, cube)
        info["flagged"] = float(fs["flag_fraction"].values)
        info["_after"] = summary_part(fs)
        return cube

    return result


def convert_group(client, files_or_ds, ms_path, *, placement=None, overwrite=False,
                  prefetch=2, key=None, flag=None, **open_kw):
    """Submit the conversion of one group; return a distributed Future of its summary.

    ``files_or_ds``: the group's subband files, or one UVH5 file of any telescope (opened
    by :func:`contimg.io.uvh5.open_any`), or a Dataset.
    ``flag``: RFI-flag while converting (True: the default strategy; or a
    :class:`graphs.flag.FlagStrategy`, mapping or TOML path): the flagging graph runs
    on the cluster alongside the writer and the MS is written with the final flags;
    the summary then has ``flagged`` (fraction) and ``flag_seconds``. Its reads are not
    pinned: use it with ``placement="any"`` (shared or local disks).
    ``open_kw`` go to :func:`contimg.io.uvh5.open_any` (``n_subbands``,
    ``allow_missing``...: for groups). The Future's result is ``{"ms", "seconds", "nbytes"}``;
    bad input raises :class:`contimg.io.uvh5.UVH5Error` here (headers are read now)
    or from the Future (data read later), and never leaves anything at ``ms_path``.
    """
    from contimg.io.uvh5 import open_any

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
