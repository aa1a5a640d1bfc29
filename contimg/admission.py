"""Stream admission by a memory budget, beside the ``in_flight`` slot count.

A group in flight needs memory in proportion to its visibilities (its stages work on
bounded chunks, but a chunk is a share of the group, and the image stage still holds
more). The stream reserves ``memory_per_visibility`` bytes per visibility for every group
it admits and admits the next one only while the reservations stay within
``memory_limit``; otherwise the group waits, and the log says why (once per group and
reason). A group alone is always admitted, even over the budget (with a warning): a
budget never blocks the queue for good.

``memory_limit`` (``[stream] memory_limit``, ``--memory-limit``): ``"auto"`` (default) is
the Dask workers' memory limit (their sum: the stages of the groups in flight run on
them); ``"0"`` or ``"off"`` turns the budget off (slots only); otherwise a size
(``"6GiB"``, ``"6 GB"``, ``"6.5e9"``, ``"512MiB"``). ``memory_per_visibility`` is measured
(bench/memory.py: the whole stream's peak over a group's visibilities).
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
          "tib": 2 ** 40}


def parse_bytes(text) -> int | None:
    """``"auto"`` -> None (ask the workers); ``"0"``/``"off"``/``"none"`` -> 0 (no
    budget); ``"6GiB"``, ``"6 GB"``, ``"6.5e9"``, ``4e9`` -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"memory limit {text!r}: must be >= 0")
        return int(text)
    t = str(text).strip().lower()
    if t == "auto":
        return None
    if t in ("", "0", "off", "none", "no"):
        return 0
    m = re.fullmatch(r"([0-9.]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)", t)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"memory limit {text!r}: expected 'auto', 'off' or a size such as "
                         "'6GiB', '6 GB' or '6.5e9' (bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def workers_memory(client) -> int:
    """Sum of the Dask workers' memory limits (0 when a worker has none or there is no
    client)."""
    if client is None:
        return 0
    try:
        workers = client.scheduler_info()["workers"].values()
    except Exception as exc:  # noqa: BLE001 - no budget rather than no stream
        log.warning("cannot read the workers' memory limits (%s): no memory budget", exc)
        return 0
    limits = [int(w.get("memory_limit") or 0) for w in workers]
    return 0 if not limits or min(limits) <= 0 else sum(limits)


def visibilities(ds) -> int:
    """Complex visibilities of a group's Dataset."""
    v = ds["VISIBILITY"]
    n = 1
    for s in v.shape:
        n *= int(s)
    return n


def _gib(n) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


class Admission:
    """Memory reservations of the groups in flight (used from the stream's dispatch
    thread only)."""

    def __init__(self, limit_bytes: int, per_visibility: float):
        if per_visibility < 0:
            raise ValueError(f"memory_per_visibility must be >= 0, got {per_visibility}")
        self.limit = int(limit_bytes or 0)
        self.per_visibility = float(per_visibility)
        self.reserved: dict[str, int] = {}
        self._told: dict[str, str] = {}

    @classmethod
    def from_settings(cls, memory_limit, per_visibility, client=None) -> "Admission":
        limit = parse_bytes(memory_limit)
        if limit is None:
            limit = workers_memory(client)
            if limit:
                log.info("memory budget: %s (the workers' memory limit), %.1f bytes per "
                         "visibility", _gib(limit), per_visibility)
        return cls(limit, per_visibility)

    def cost(self, nvis: int) -> int:
        return int(self.per_visibility * nvis)

    def check(self, gid: str, nvis: int) -> str | None:
        """None when ``gid`` may start now, else why it waits."""
        if not self.limit:
            return None
        need = self.cost(nvis)
        held = sum(self.reserved.values())
        if not self.reserved:
            if need > self.limit:
                log.warning("group %s: needs ~%s, more than the memory budget %s; started "
                            "alone", gid, _gib(need), _gib(self.limit))
            return None
        if held + need <= self.limit:
            return None
        return (f"memory budget: needs ~{_gib(need)} ({nvis / 1e6:.0f} M visibilities x "
                f"{self.per_visibility:g} B), {_gib(held)} of {_gib(self.limit)} held by "
                f"{len(self.reserved)} group(s) in flight")

    def waiting(self, gid: str, why: str) -> None:
        """Log why ``gid`` waits (once per group and reason)."""
        if self._told.get(gid) != why:
            self._told[gid] = why
            log.info("group %s: waits: %s", gid, why)

    def admit(self, gid: str, nvis: int) -> None:
        self.reserved[gid] = self.cost(nvis)
        self._told.pop(gid, None)

    def release(self, gid: str) -> None:
        self.reserved.pop(gid, None)
