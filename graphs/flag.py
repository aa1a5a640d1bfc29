"""RFI flagging as a lazy Dask graph over the visibility Dataset.

``flag_dataset(ds, strategy)`` returns ``ds`` with ``FLAG = FLAG | new flags``, lazily.
The strategy is data (:class:`FlagStrategy`), not code: build it from a dict or any
simple mapping (TOML files are read by :func:`contimg.config.load_flag_strategy`).

The graph, per group::

    VISIBILITY, FLAG (chunked one subband per chunk)
      -> flag-band-*       baseline blocks (time: all, baseline_id: block, frequency:
                           all), each cut out of every subband chunk in one copy
      -> flag-block-*      kernels.flagging.flag_block per block (per-plane RFI flags),
                           then, in the same task, new flags / available samples per
                           baseline and per (time, channel) counted from its codes and
                           the flags packed to one bit per sample (the codes, one byte
                           per visibility, never outlive the task; ``store`` may keep
                           the bits on disk until the decisions)
      -> flag-noise-*      kernels.flagging.plane_noise per block (tiny: (nbl, npol))
      -> flag-count-*      the blocks' counts, summed
      -> flag-antennas-*   antenna decisions from the noise and flagged fractions
      -> flag-combine-*    block flags | bad antennas | array-wide (time, channel) votes
      -> flag-unblock-*    back to the input FLAG chunks (one copy)

Why the whole band per block (``frequency_chunking="band"``, the default): the
frequency-direction SumThreshold, the Gaussian background and the per-channel noise
estimate all work along frequency. Inside one 48-channel subband the background is
one-sided over a quarter of the chunk, the 64-channel window (the one that sees weak
broadband RFI) does not fit and the noise running median has 48 channels to work with.
Measured on synthetic groups (tests/test_flagging.py, /tmp sweeps of this issue): with
RFI of 5-50 sigma both are equivalent (precision 0.994 vs 0.990, recall 1.0 both);
with 2-3 sigma RFI the whole band finds broadband bursts far better (burst recall 0.999
vs 0.941, overall recall 0.971 vs 0.916). The price is one copy of VISIBILITY into
(time: all, baseline_id: block, frequency: all) blocks, ~75 MB per 256-baseline block,
which also makes the result independent of the chunking (dask == numpy, exactly). The
copy is made by hand (:func:`_baseline_blocks`): dask's ``rechunk`` plans this change
of both chunk axes in three stages (three copies, ~3-4 CPU-s of a group).
``frequency_chunking="subband"`` keeps the input frequency chunks (no rechunk: useful
when the subbands of a group live on different workers and the network is the
bottleneck).

Antenna-, channel- and integration-wide decisions use every baseline of the group;
they are small reductions of the block results, so the graph stays one pass over the
data. Task names start with ``flag-`` (``flag-block``, ``flag-noise``, ``flag-combine``,
...). Cost of a full DSA-110 group (4656 baselines x 24 x 768 x 2, in memory, two
threads): ~16-18 CPU-s, ~80 % of it in ``flag_block`` (reading the UVH5 files adds
~2.5 CPU-s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph

from graphs.contract import VIS_DIMS
from kernels import flagging as kf

log = logging.getLogger(__name__)


@dataclass
class FlagStrategy:
    """Configuration of the RFI flagger (defaults tuned for DSA-110 groups of 24
    integrations x 768 channels x 4656 baselines, XX/YY, ~2.3 Jy noise per visibility).

    Thresholds are in robust standard deviations of the background-subtracted
    amplitude (1.4826 x MAD per channel).
    """

    # --- SumThreshold -----------------------------------------------------------
    #: chi_1: single-sample threshold of the last iteration (AOFlagger uses ~6).
    threshold: float = 6.0
    #: window M uses chi_1 / rho**log2(M) (Offringa et al. 2010: rho = 1.5).
    rho: float = 1.5
    #: windows along time (24 integrations per group: up to 16).
    time_windows: tuple[int, ...] = (1, 2, 4, 8, 16)
    #: windows along frequency (64 channels = 15.6 MHz; adding 128 found no more
    #: RFI in our tests, but flagged 30 % more clean data on long baselines whose sky
    #: structure the background does not follow).
    freq_windows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    #: iterations of background fit + SumThreshold; iteration k uses the threshold
    #: times ``threshold_step ** (iterations - 1 - k)``, so strong RFI is flagged first
    #: and left out of the next background fit. AOFlagger uses 3 (4, 2, 1); on DSA-110
    #: groups 2 (2, 1) found the same RFI with fewer false flags, for 2/3 of the cost.
    iterations: int = 2
    threshold_step: float = 2.0
    #: also flag windows whose mean is below -threshold (dropouts); RFI adds power.
    two_sided: bool = False
    #: hold a window with c unflagged samples to chi_1 / rho**log2(c) rather than
    #: chi_1 / rho**log2(M). AOFlagger uses M (False), which lets long windows that
    #: are mostly flagged RFI flag the few clean samples next to it (it grows each
    #: strong RFI region by up to M - 1 samples); c removes that without losing RFI.
    threshold_by_count: bool = True

    # --- background and noise ---------------------------------------------------
    #: Gaussian widths of the masked low-pass background, in integrations and channels.
    #: 3 integrations (~40 s) follows primary-beam and gain drifts; 3 channels
    #: (0.7 MHz) follows the frequency structure of the sky on the 2 km baselines
    #: (periods down to ~20 channels) while still averaging ~60 samples.
    background_time_sigma: float = 3.0
    background_freq_sigma: float = 3.0
    #: kernel truncation, in sigmas.
    background_truncate: float = 3.0
    #: "none" | "autos" | "all": fit the background locally *linear* in time (rather
    #: than locally constant) for autocorrelations / all planes; it removes the bias a
    #: local constant has at the first and last integrations under a drift. Off by
    #: default: the rank-1 gain G(t) of the autocorrelations already absorbs their
    #: drift, cross-correlations hardly drift (their signal is ~ the noise), and in the
    #: first iteration an unflagged burst a few integrations from the edge levers the
    #: linear fit (on a simulated full group it multiplied the autocorrelations' false
    #: flags by 13). Costs 2.5x the local-constant smooth.
    background_time_linear: str = "none"
    #: autocorrelations: fit a rank-1 bandpass x gain model first (autos carry ~1e3
    #: times more signal than noise, and a Gaussian leaves ripple residuals of many sigma).
    rank1_autocorrelations: bool = True
    #: frequency width (channels) of the background of autocorrelations after the
    #: rank-1 model (used with rank1_autocorrelations).
    #: 0 (time only): the rank-1 bandpass absorbs a line present most of the group, and
    #: smoothing along frequency would spread its negative imprint into the neighbouring
    #: channels as false positives (the array-wide vote flags the line itself).
    background_freq_sigma_autos: float = 0.0
    #: running-median width (channels) of the per-channel noise estimate.
    noise_channels: int = 33

    # --- MAD clip, SIR ----------------------------------------------------------
    #: two-sided clip of the last residual at this many robust sigma (0: off).
    mad_clip: float = 7.0
    #: SIR eta along time and along frequency (0: off; AOFlagger uses 0.2 for both).
    #: SIR grows a flagged run of length L by eta/(1-eta) L on each side: right for
    #: RFI with soft edges, but at 12.9 s x 244 kHz DSA-110's lines and bursts have
    #: sharp edges, and growth is pure loss (at 0.2 a 400-channel burst grows by 100
    #: channels on each side; eta_time 0.1 tripled the clean data flagged on simulated
    #: groups). 0.05 in time only fills gaps inside runs of >= 19 integrations. Raise
    #: them (0.2) for data with soft-edged RFI.
    sir_eta_time: float = 0.05
    sir_eta_freq: float = 0.0

    # --- whole channels / integrations / antennas ------------------------------
    #: per baseline: flag a channel whose new flags cover more than this fraction of
    #: its available integrations, and an integration flagged in more than this
    #: fraction of its available channels. (Fractions never count data flagged before
    #: flagging: an upstream-flagged subband does not push anything over.) A burst
    #: covering 90 % of the band is RFI on 90 % of it, hence the high time threshold.
    channel_fraction: float = 0.8
    time_fraction: float = 0.95
    #: array-wide: the same over all baselines and polarisations of the group.
    global_channel_fraction: float = 0.9
    global_time_fraction: float = 0.95
    #: array-wide vote per (integration, channel): flagged on more than this fraction
    #: of the baselines -> flagged on all. RFI from one emitter reaches every baseline
    #: (weaker on some, and drowned in the autocorrelations' bandpass), whereas noise
    #: false positives are independent between baselines and never win the vote.
    global_tf_fraction: float = 0.5
    #: flag an antenna whose baselines are flagged at more than this fraction ...
    antenna_fraction: float = 0.5
    #: ... or whose cross-correlation noise differs from the median antenna's by more
    #: than this factor (garbage or dead inputs). <= 1 disables.
    antenna_noise_ratio: float = 3.0

    # --- layout -----------------------------------------------------------------
    #: flag in any polarisation -> flag in all (RFI is seldom polarised).
    combine_polarizations: bool = True
    #: "band": rechunk to baseline blocks over the whole band (best accuracy);
    #: "subband": flag each input frequency chunk on its own (no rechunk).
    frequency_chunking: str = "band"
    #: baselines per block (256 x 24 x 768 x 2 complex64 = 75 MB).
    baseline_block: int = 256


    def __post_init__(self):
        self.time_windows = tuple(int(w) for w in self.time_windows)
        self.freq_windows = tuple(int(w) for w in self.freq_windows)
        problems = []
        if self.threshold <= 0:
            problems.append(f"threshold must be > 0, got {self.threshold}")
        if self.rho < 1:
            problems.append(f"rho must be >= 1, got {self.rho}")
        if self.iterations < 1:
            problems.append(f"iterations must be >= 1, got {self.iterations}")
        if self.threshold_step < 1:
            problems.append(f"threshold_step must be >= 1, got {self.threshold_step}")
        if any(w < 1 for w in self.time_windows + self.freq_windows):
            problems.append("windows must be >= 1")
        for name in ("sir_eta_time", "sir_eta_freq"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                problems.append(f"{name} must be in [0, 1), got {v}")
        for name in ("channel_fraction", "time_fraction", "global_channel_fraction",
                     "global_time_fraction", "global_tf_fraction", "antenna_fraction"):
            v = getattr(self, name)
            if not 0 <= v:
                problems.append(f"{name} must be >= 0 (>= 1 disables), got {v}")
        if min(self.background_time_sigma, self.background_freq_sigma,
               self.background_freq_sigma_autos) < 0:
            problems.append("background sigmas must be >= 0")
        if self.noise_channels < 1:
            problems.append(f"noise_channels must be >= 1, got {self.noise_channels}")
        if self.mad_clip < 0:
            problems.append(f"mad_clip must be >= 0, got {self.mad_clip}")
        if self.background_time_linear not in ("autos", "all", "none"):
            problems.append("background_time_linear must be 'autos', 'all' or 'none', "
                            f"got {self.background_time_linear!r}")
        if self.frequency_chunking not in ("band", "subband"):
            problems.append(
                f"frequency_chunking must be 'band' or 'subband', got {self.frequency_chunking!r}")
        if self.baseline_block < 1:
            problems.append(f"baseline_block must be >= 1, got {self.baseline_block}")
        if problems:
            raise ValueError("invalid FlagStrategy: " + "; ".join(problems))

    # --- loading ----------------------------------------------------------------
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "FlagStrategy":
        """From a dict / any mapping; unknown keys raise ValueError naming them.

        A ``[flag]`` sub-table (as in a pipeline TOML file) is accepted too.
        """
        if mapping is None:
            return cls()
        mapping = dict(mapping)
        if "flag" in mapping and isinstance(mapping["flag"], Mapping):
            mapping = dict(mapping["flag"])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - names)
        if unknown:
            raise ValueError(f"unknown FlagStrategy keys {unknown}; known: {sorted(names)}")
        return cls(**mapping)

    @classmethod
    def load(cls, obj: "FlagStrategy | Mapping | None") -> "FlagStrategy":
        """Strategy, mapping or None (defaults). TOML files and text are read by
        :func:`contimg.config.load_flag_strategy` (configuration lives in contimg)."""
        if isinstance(obj, cls):
            return obj
        if obj is None or isinstance(obj, Mapping):
            return cls.from_mapping(obj)
        raise TypeError(f"flag strategy {obj!r}: expected a FlagStrategy, a mapping or "
                        "None (read TOML with contimg.config.load_flag_strategy)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["time_windows"] = list(self.time_windows)
        d["freq_windows"] = list(self.freq_windows)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    # --- kernel arguments -------------------------------------------------------
    def kernel_args(self) -> tuple:
        """Positional arguments of ``kernels.flagging.flag_block`` after vis, flag, is_auto."""
        return (
            int(self.iterations), float(self.threshold_step), float(self.threshold),
            float(self.rho), np.asarray(self.time_windows, dtype=np.int64),
            np.asarray(self.freq_windows, dtype=np.int64), bool(self.two_sided),
            bool(self.threshold_by_count),
            float(self.background_time_sigma), float(self.background_freq_sigma),
            float(self.background_freq_sigma_autos),
            float(self.background_truncate),
            {"none": 0, "autos": 1, "all": 2}[self.background_time_linear],
            int(self.noise_channels // 2),
            bool(self.rank1_autocorrelations), float(self.mad_clip),
            float(self.sir_eta_time), float(self.sir_eta_freq),
            bool(self.combine_polarizations), float(self.channel_fraction),
            float(self.time_fraction),
        )


# ---------------------------------------------------------------------------------
# block functions (numpy; what the dask tasks run)
# ---------------------------------------------------------------------------------

def _flag_block(vis, flag, is_auto, args):
    # C-contiguous in, so that numba compiles (and caches) one specialisation only; a
    # copy happens only for views (e.g. chunks of a numpy-backed Dataset).
    return kf.flag_block(np.ascontiguousarray(vis), np.ascontiguousarray(flag, dtype=bool),
                         np.ascontiguousarray(is_auto, dtype=bool), *args)


def _plane_noise(vis, flag):
    return kf.plane_noise(np.ascontiguousarray(vis), np.ascontiguousarray(flag, dtype=bool))


def _one(parts):
    """The only block of a (nested) list of blocks of a contracted index. (dask's
    ``concatenate=True`` would copy even a single block.)"""
    flat = _flatten(parts)
    if len(flat) != 1:
        raise ValueError(f"expected one block, got {len(flat)}")
    return flat[0]


def _plane_noise_parts(vis, flag):
    return _plane_noise(_one(vis), _one(flag))


class _Coded:
    """What a ``flag-block`` task keeps of its block's uint8 codes once it has counted
    them: the new flags / available samples per baseline (``bl`` (B, 2)) and per (time,
    channel) (``tf`` (T, F, 2)), and the flags (``codes != CODE_OK``) as one bit per
    sample (``bits``: :func:`kernels.flagging.pack_codes`, or what ``store.put`` made of
    them). The codes themselves (one byte per visibility) live only inside the task."""

    __slots__ = ("shape", "bl", "tf", "bits")

    def __init__(self, shape, bl, tf, bits):
        self.shape, self.bl, self.tf, self.bits = shape, bl, tf, bits


def _flag_coded(vis, flag, is_auto, args, store=None):
    codes = _flag_block(vis, flag, is_auto, args)
    bl = kf.code_counts_baseline(codes)
    tf = kf.code_counts_tf(codes)
    bits = kf.pack_codes(codes)
    shape = codes.shape
    del codes
    return _Coded(shape, bl, tf, bits if store is None else store.put(bits))


class _Bits:
    """A block's flags as bits (or their ``store`` handle) and the block's shape: all
    that waits for the array-wide decisions (its counts are reduced meanwhile)."""

    __slots__ = ("shape", "bits")

    def __init__(self, shape, bits):
        self.shape, self.bits = shape, bits


def _bits_of(coded):
    return _Bits(coded.shape, coded.bits)


def _bl_counts(coded):
    """(nbl, 2): new flags and available samples per baseline of a block (given as the
    list of its chunks along time, frequency and polarization)."""
    return sum(c.bl for c in _flatten(coded))


def _tf_counts(coded):
    """(1, nt, nf, 2): new flags and available samples per (time, channel) of a block,
    with a leading axis of one per baseline block (summed over blocks afterwards)."""
    return _one(coded).tf[None]


def _counts(codes):
    """New flags and available samples per baseline and per (time, channel)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    bl = kf.code_counts_baseline(codes)
    tf = kf.code_counts_tf(codes)
    return bl[:, 0], bl[:, 1], tf[..., 0], tf[..., 1]


def _ratio(n, a):
    n = np.asarray(n, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    return np.where(a > 0, n / np.maximum(a, 1.0), 0.0)


def _decide(noise, n_bl, a_bl, n_tf, a_tf, ant1, ant2, n_ant, strategy):
    """Small arrays -> (bad baseline (nbl,), bad (time, channel) cells (nt, nf)).

    Fractions are of new flags among the available (not missing) samples, so data
    flagged upstream (a dead subband, an antenna flagged by the correlator) neither
    count as RFI nor push their neighbours over a threshold.
    """
    frac_bl = _ratio(n_bl, a_bl)
    bad_ant = kf.antenna_flags(noise, frac_bl, ant1, ant2, n_ant,
                               noise_ratio=strategy.antenna_noise_ratio,
                               max_fraction=strategy.antenna_fraction)
    bad_bl = bad_ant[ant1] | bad_ant[ant2]
    bad_tf = _ratio(n_tf, a_tf) > strategy.global_tf_fraction
    bad_tf |= (_ratio(n_tf.sum(axis=0), a_tf.sum(axis=0))
               > strategy.global_channel_fraction)[None, :]
    bad_tf |= (_ratio(n_tf.sum(axis=1), a_tf.sum(axis=1))
               > strategy.global_time_fraction)[:, None]
    if bad_ant.any():
        log.info("flagging antennas %s", np.nonzero(bad_ant)[0].tolist())
    return bad_bl, bad_tf


def _combine(codes, bad_bl, bad_tf):
    return kf.combine_codes(np.ascontiguousarray(codes, dtype=np.uint8),
                            np.ascontiguousarray(bad_bl, dtype=bool),
                            np.ascontiguousarray(bad_tf, dtype=bool))


def _combine_coded(coded, bad_bl, bad_tf, store=None):
    bits = coded.bits if store is None else store.get(coded.bits)
    return kf.combine_packed(bits, *coded.shape, np.ascontiguousarray(bad_bl, dtype=bool),
                             np.ascontiguousarray(bad_tf, dtype=bool))


# ---------------------------------------------------------------------------------
# in-memory path (numpy)
# ---------------------------------------------------------------------------------

def flag_arrays(vis, flag, ant1, ant2, n_ant=None, strategy=None):
    """The whole flagger on numpy arrays ``(time, baseline, frequency, polarization)``.

    Same result as :func:`flag_dataset` with ``frequency_chunking="band"`` (the graph
    runs the same functions per block). Returns the new FLAG (old | new).
    """
    st = FlagStrategy.load(strategy)
    vis = np.asarray(vis)
    flag = np.asarray(flag, dtype=bool)
    ant1 = np.asarray(ant1, dtype=np.int64)
    ant2 = np.asarray(ant2, dtype=np.int64)
    n_ant = int(n_ant if n_ant is not None else max(ant1.max(), ant2.max()) + 1)
    codes = _flag_block(vis, flag, ant1 == ant2, st.kernel_args())
    noise = _plane_noise(vis, flag)
    bad_bl, bad_tf = _decide(noise, *_counts(codes), ant1, ant2, n_ant, st)
    return _combine(codes, bad_bl, bad_tf)


# ---------------------------------------------------------------------------------
# the graph
# ---------------------------------------------------------------------------------

def _as_dask(x):
    return x if isinstance(x, da.Array) else da.from_array(np.asarray(x), chunks=-1)


def _flatten(parts):
    if isinstance(parts, (list, tuple)):
        return [q for p in parts for q in _flatten(p)]
    return [parts]


def _cut_band(idx, parts):
    """Baselines ``idx[0] .. idx[-1]`` of the frequency chunks ``parts`` (in order),
    as one new C-contiguous (time, block, frequency, polarization) array."""
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    return np.concatenate([p[:, lo:hi] for p in _flatten(parts)], axis=2)


def _cut_channels(idx, parts):
    """Channels ``idx[0] .. idx[-1]`` of the baseline blocks ``parts`` (in order), as
    one new (time, baseline, channels, polarization) array."""
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    return np.concatenate([p[:, :, lo:hi] for p in _flatten(parts)], axis=1)


def _baseline_blocks(x, block):
    """``x`` (time, baseline, frequency, polarization) in chunks of (all, ``block``,
    all, all), every element copied once.

    ``x.rechunk`` would do the same, but dask plans a change of both the baseline and
    the frequency chunking (one subband per chunk -> baseline blocks) in three stages,
    i.e. three copies of VISIBILITY (and a split would copy again): ~3-4 CPU-s per
    group, as much as a quarter of the flagger. Here each block is one task that cuts
    its baselines out of every frequency chunk and concatenates them. (Inputs chunked
    along time, baseline or polarization take the ``rechunk`` path.)
    """
    if any(len(x.chunks[i]) != 1 for i in (0, 1, 3)) or x.shape[1] == 0:
        return x.rechunk({0: -1, 1: block, 2: -1, 3: -1})
    idx = da.arange(x.shape[1], chunks=block)
    # align_arrays=False: nothing to align (idx and x share no index), and dask's
    # alignment would warn about "more chunks", counting the contracted ones.
    return da.blockwise(_cut_band, "tbgp", idx, "b", x, "tBfp",
                        new_axes={"g": x.shape[2]}, concatenate=False, dtype=x.dtype,
                        align_arrays=False, name=f"flag-band-{tokenize(x, block)}")


def _to_chunks(x, chunks):
    """Baseline blocks (all, block, all, all) back to ``chunks``, copying once when
    ``chunks`` keeps time, baseline and polarization whole (e.g. one subband per
    chunk: one task per output chunk concatenates its channels of every block); any
    other chunking by ``rechunk``."""
    chunks = tuple(tuple(c) for c in chunks)
    if x.chunks == chunks:
        return x
    if (all(len(chunks[i]) == 1 for i in (0, 1, 3))
            and all(len(x.chunks[i]) == 1 for i in (0, 2, 3)) and x.shape[2] > 0):
        idx = da.from_array(np.arange(x.shape[2]), chunks=(chunks[2],))
        return da.blockwise(_cut_channels, "thfp", idx, "f", x, "tbFp",
                            new_axes={"h": x.shape[1]}, concatenate=False, dtype=x.dtype,
                            align_arrays=False, name=f"flag-unblock-{tokenize(x, chunks)}")
    return x.rechunk(chunks)


def flag_dataset(ds: xr.Dataset, strategy=None, store=None) -> xr.Dataset:
    """Lazily flag RFI in a visibility Dataset; returns ``ds`` with FLAG = old | new.

    ``strategy``: a :class:`FlagStrategy`, a mapping, a TOML path/text, or None for
    the DSA-110 defaults. Nothing is computed here; VISIBILITY is untouched and the new
    FLAG keeps the input FLAG's chunks. Works on numpy-backed Datasets too (they are
    wrapped in single-chunk dask arrays).

    ``store``: where each block's flags wait (one bit per visibility) for the
    array-wide decisions: None keeps them in memory (1/8 byte per visibility of the
    group); or an object with ``put(bits) -> handle`` and ``get(handle) -> bits``
    (called from the tasks; e.g. files beside the MS, :mod:`contimg.flagging`), which
    makes the flagger's memory independent of the group's size.
    """
    st = FlagStrategy.load(strategy)
    for name in ("VISIBILITY", "FLAG"):
        if name not in ds:
            raise ValueError(f"flag_dataset needs {name}; the Dataset has {list(ds.data_vars)}")
        if tuple(ds[name].dims) != VIS_DIMS:
            raise ValueError(f"{name} has dims {tuple(ds[name].dims)}, expected {VIS_DIMS}")
    vis = _as_dask(ds["VISIBILITY"].data)
    flag_in = _as_dask(ds["FLAG"].data)
    out_chunks = flag_in.chunks
    nt, nbl, nf, npol = vis.shape
    ant1 = np.asarray(ds["baseline_antenna1_id"].values, dtype=np.int64)
    ant2 = np.asarray(ds["baseline_antenna2_id"].values, dtype=np.int64)
    n_ant = int(ds.sizes.get("antenna_id", 0) or (max(ant1.max(), ant2.max()) + 1 if nbl else 0))

    block = min(st.baseline_block, max(nbl, 1))
    band = st.frequency_chunking == "band"
    vis_band = _baseline_blocks(vis, block)
    flag_band = _baseline_blocks(flag_in.astype(bool), block)
    if band:
        vis_b, flag_b = vis_band, flag_band
    else:
        target = {0: -1, 1: block, 2: vis.chunks[2], 3: -1}
        vis_b = vis.rechunk(target)
        flag_b = flag_in.astype(bool).rechunk(vis_b.chunks)
    is_auto = da.from_array(ant1 == ant2, chunks=(vis_b.chunks[1],))
    args = st.kernel_args()
    tok = tokenize(vis_b, flag_b, st.to_json(), ant1, ant2, n_ant, store)

    # one _Coded per block: its counts and its flags as bits (the block's uint8 codes,
    # one byte per visibility, are freed inside the task)
    codes = da.blockwise(
        partial(_flag_coded, args=args, store=store), "tbfp", vis_b, "tbfp", flag_b,
        "tbfp", is_auto, "b", dtype=object, meta=np.empty((0, 0, 0, 0), object),
        name=f"flag-block-{tok}",
    )
    # the bits apart from the counts (a plain layer, never fused into the combine), so
    # that a block's counts are freed once reduced, not held with its bits until the
    # decisions
    bname = f"flag-bits-{tok}"
    layer = {(bname,) + k[1:]: (_bits_of, k) for k in flatten(codes.__dask_keys__())}
    bits = da.Array(HighLevelGraph.from_collections(bname, layer, dependencies=[codes]),
                    bname, codes.chunks, meta=np.empty((0, 0, 0, 0), object))

    # per-plane noise over the whole band of each block (reduces t and f)
    noise = da.blockwise(
        _plane_noise_parts, "bp", vis_band, "tbfp", flag_band, "tbfp",
        dtype=np.float64, name=f"flag-noise-{tok}", concatenate=False,
    )
    # new flags / available samples per baseline and per (time, channel): one pass
    # over each block of codes for each (numba), then small sums
    bl_counts = da.blockwise(
        _bl_counts, "bk", codes, "tbfp", new_axes={"k": 2}, dtype=np.int64,
        concatenate=False, name=f"flag-count-bl-{tok}",
    )
    tf_counts = da.blockwise(
        _tf_counts, "btfk", codes, "tbfp", new_axes={"k": 2}, adjust_chunks={"b": 1},
        dtype=np.int64, concatenate=False, name=f"flag-count-tf-{tok}",
    ).sum(axis=0)
    n_bl = bl_counts[:, 0]
    a_bl = bl_counts[:, 1]
    n_tf = tf_counts[..., 0]
    a_tf = tf_counts[..., 1]

    def decide(noise_, n_bl_, a_bl_, n_tf_, a_tf_):
        bad_bl, bad_tf = _decide(noise_, n_bl_, a_bl_, n_tf_, a_tf_, ant1, ant2, n_ant, st)
        return np.concatenate([bad_bl, bad_tf.ravel()])

    small = da.map_blocks(
        decide, noise.rechunk(-1), n_bl.rechunk(-1), a_bl.rechunk(-1), n_tf.rechunk(-1),
        a_tf.rechunk(-1), dtype=bool, chunks=((nbl + nt * nf,),), drop_axis=1,
        name=f"flag-antennas-{tok}", meta=np.empty((0,), bool),
    )
    bad_bl = small[:nbl].rechunk((codes.chunks[1],))
    bad_tf = small[nbl:].reshape(nt, nf).rechunk((codes.chunks[0], codes.chunks[2]))
    new = _to_chunks(da.blockwise(
        partial(_combine_coded, store=store), "tbfp", bits, "tbfp", bad_bl, "b",
        bad_tf, "tf", dtype=bool, meta=np.empty((0, 0, 0, 0), bool),
        name=f"flag-combine-{tok}",
    ), out_chunks)

    out = ds.copy()
    out["FLAG"] = xr.DataArray(new, dims=VIS_DIMS, coords=ds["FLAG"].coords,
                               attrs={**ds["FLAG"].attrs, "flag_strategy": st.to_json()})
    return out


def flag_summary(ds: xr.Dataset) -> xr.Dataset:
    """Flagged fraction per antenna, channel, integration, baseline and overall (lazy).

    Returns a small Dataset: ``flag_fraction_antenna`` (antenna_id),
    ``flag_fraction_channel`` (frequency), ``flag_fraction_time`` (time),
    ``flag_fraction_baseline`` (baseline_id), ``flag_fraction`` (scalar). An antenna's
    fraction is over all samples of the baselines it is part of (its autocorrelation
    once). ``.compute()`` it (or ``.load()``) to get numbers.
    """
    flag = ds["FLAG"]
    data = flag.data if isinstance(flag.data, da.Array) else _as_dask(flag.data)
    f = xr.DataArray(data, dims=flag.dims, coords=flag.coords)
    return _summary(ds, f.mean(dim=("time", "frequency", "polarization")),
                    f.mean(dim=("time", "baseline_id", "polarization")),
                    f.mean(dim=("baseline_id", "frequency", "polarization")), f.mean())


def flag_summary_of_cube(ds: xr.Dataset, cube: np.ndarray) -> xr.Dataset:
    """:func:`flag_summary` of a computed flag cube ``(time, baseline, frequency,
    polarization)`` for ``ds``'s coordinates, already computed: one counting pass
    (:func:`kernels.flagging.flag_counts`) instead of a float copy per reduction."""
    from kernels.flagging import flag_counts

    cube = np.ascontiguousarray(cube, dtype=bool)
    T, B, F, P = cube.shape
    tb, fc = flag_counts(cube)
    dims = VIS_DIMS
    frac_bl = xr.DataArray(tb.sum(axis=0) / max(T * F * P, 1), dims=dims[1:2])
    frac_ch = xr.DataArray(fc / max(T * B * P, 1), dims=dims[2:3])
    frac_t = xr.DataArray(tb.sum(axis=1) / max(B * F * P, 1), dims=dims[:1])
    total = xr.DataArray(tb.sum() / max(cube.size, 1))
    return _summary(ds, frac_bl, frac_ch, frac_t, total)


def _antenna_fraction(frac_bl, ant1, ant2, n_ant):
    """Mean of ``frac_bl`` over each antenna's baselines (its autocorrelation once);
    NaN for an antenna without baselines."""
    frac = np.asarray(frac_bl, dtype=np.float64)
    cross = ant1 != ant2
    s = (np.bincount(ant1, weights=frac, minlength=n_ant)
         + np.bincount(ant2[cross], weights=frac[cross], minlength=n_ant))
    count = np.bincount(ant1, minlength=n_ant) + np.bincount(ant2[cross], minlength=n_ant)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, s / np.maximum(count, 1), np.nan)


def _summary(ds, frac_bl, frac_ch, frac_t, total):
    ant1 = np.asarray(ds["baseline_antenna1_id"].values, dtype=np.int64)
    ant2 = np.asarray(ds["baseline_antenna2_id"].values, dtype=np.int64)
    n_ant = int(ds.sizes.get("antenna_id", 0) or (max(ant1.max(), ant2.max()) + 1))
    # per antenna, by bincount over the baselines (a dense antenna x baseline incidence
    # matrix would grow as antennas^3: 29 MB for 193 antennas, 32 GB for 2000)
    data = frac_bl.data
    if isinstance(data, da.Array):
        data = da.map_blocks(_antenna_fraction, data.rechunk(-1), ant1, ant2, n_ant,
                             chunks=((n_ant,),), dtype=np.float64,
                             name=f"flag-summary-antenna-{tokenize(data, ant1, ant2, n_ant)}")
    else:
        data = _antenna_fraction(data, ant1, ant2, n_ant)
    frac_ant = xr.DataArray(data, dims=("antenna_id",))
    out = xr.Dataset(
        {
            "flag_fraction_antenna": frac_ant,
            "flag_fraction_channel": frac_ch,
            "flag_fraction_time": frac_t,
            "flag_fraction_baseline": frac_bl,
            "flag_fraction": total,
        }
    )
    for c in ("antenna_id", "antenna_name"):
        if c in ds.coords and ds[c].dims == ("antenna_id",):
            out = out.assign_coords({c: ds[c]})
    for c in ("baseline_antenna1_id", "baseline_antenna2_id", "time", "frequency"):
        if c in ds.coords:
            out = out.assign_coords({c: ds[c]})
    return out
