"""Where each chunk of a group's graph must run: the worker that can see its file.

Lazy and I/O-free: these helpers only look at the Dataset's ``chunk_files`` attribute
(written by :func:`contimg.io.uvh5.open_group`: one source file per frequency chunk)
and at a placement (file -> workers that can read it). :mod:`contimg.convert` uses
them to pin each block's read tasks while the MS writer task streams the blocks.
"""

from __future__ import annotations

import os


def chunk_files(ds) -> list[str]:
    """The file read by each frequency chunk ("" for a filled, missing subband)."""
    files = ds.attrs.get("chunk_files")
    nchunks = len(ds.VISIBILITY.data.chunks[2])
    if files is None or len(files) != nchunks:
        raise ValueError(
            f"Dataset has {nchunks} frequency chunks but its 'chunk_files' attribute lists "
            f"{None if files is None else len(files)}; open it with contimg.io.uvh5")
    return list(files)


def placement_from_directories(mapping: dict, files, workers: dict) -> dict[str, list[str]]:
    """Resolve ``{worker name, address or host: [directories]}`` to file -> addresses.

    ``workers`` is ``client.scheduler_info()["workers"]``. A file is placed on every
    worker one of whose directories contains it; a file no worker sees is an error.
    """
    by_key = {}
    for addr, info in workers.items():
        for key in (addr, str(info.get("name")), info.get("host")):
            if key is not None:
                by_key.setdefault(str(key), set()).add(addr)
    unknown = [k for k in mapping if str(k) not in by_key]
    if unknown:
        raise ValueError(f"placement names unknown worker(s) {unknown}; workers are "
                         f"{sorted(by_key)}")
    out = {}
    for f in files:
        real = os.path.realpath(f)
        addrs = set()
        for key, dirs in mapping.items():
            for d in ([dirs] if isinstance(dirs, str) else dirs):
                d = os.path.realpath(d).rstrip("/") + "/"
                if real.startswith(d):
                    addrs |= by_key[str(key)]
        if not addrs:
            raise ValueError(f"{f}: no worker in the placement sees this file")
        out[f] = sorted(addrs)
    return out


def chunk_workers(ds, placement: dict[str, list[str]] | None) -> list[list[str] | None]:
    """Allowed workers for each frequency chunk (None: anywhere, e.g. a filled subband)."""
    out = []
    for f in chunk_files(ds):
        if not f or placement is None:
            out.append(None)
        elif f in placement:
            out.append(list(placement[f]))
        else:
            raise ValueError(f"{f}: not in the placement")
    return out
