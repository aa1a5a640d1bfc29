"""The sections of contimg's configuration: one frozen dataclass per TOML table
(``[paths]``, ``[dask]``, ``[stream]``, ``[flag]``, ``[calibrate]``, ``[image]``,
``[science]``, ``[app]``), the :class:`Config` that holds them, and the lookup of a
``section.field`` key. Loading, precedence and the command line are in
:mod:`contimg.config`, which re-exports everything public here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from contimg.config_fields import (
    ConfigError, _flag_strategy_class, _from_value, _own_specs, _Spec, _strategy_specs,
    _suggest, parse_threshold, setting,
)

STAGES = ("convert", "flag", "calibrate", "apply", "image", "photometry")   # see contimg.pipeline
W_MODES = ("auto", "snapshot", "wstack")


class _Section:
    """Checks every field's type and choices on construction (also when built by hand)."""

    def __post_init__(self):
        self._check_fields(type(self))
        self._check()

    def _check_fields(self, cls, skip=()):
        for spec in _own_specs(cls).values():
            if spec.name in skip:
                continue
            value = _from_value(spec, getattr(self, spec.name), spec.name)
            object.__setattr__(self, spec.name, value)

    def _check(self):
        pass


@dataclass(frozen=True)
class PathsConfig(_Section):
    """Where state and products live."""

    db: Path | None = setting(None, "state database (default <state_dir>/db/pipeline.sqlite3)",
                              env="PIPELINE_DB", flags=("--db",), metavar="PATH")
    state_dir: Path = setting(Path("state"), "state directory (holds db/pipeline.sqlite3)",
                              env="PIPELINE_STATE_DIR")
    output: Path | None = setting(None, "products directory (ms/, cal/, images/ below it)",
                                  flags=("--output", "--products"), metavar="DIR")
    incoming: Path | None = setting(None, "directory the subband files arrive in",
                                    flags=("--incoming",), metavar="DIR")

    def _parse_mode(value):  # noqa: N805 - the parser of product_mode, not a method
        from contimg.io.files import parse_mode

        return parse_mode(value)

    product_mode: int = setting(
        0o644, "permission bits of product files, octal ('0640'); their directories get x "
        "where r is set; never world-writable",
        parse=_parse_mode)

    def _check(self):
        object.__setattr__(self, "product_mode", PathsConfig._parse_mode(self.product_mode))


@dataclass(frozen=True)
class DaskConfig(_Section):
    """The Dask cluster the commands use."""

    scheduler: str = setting("", "address of a Dask scheduler ('': start a LocalCluster)",
                             flags=("--scheduler",), metavar="ADDRESS")
    workers: int = setting(1, "LocalCluster worker processes (the cores are shared among "
                           "them as threads)", flags=("--workers",))
    dashboard_address: str = setting(
        "127.0.0.1:0", "LocalCluster dashboard address (default: this host only, any port; "
        "':0' listens on every interface, unauthenticated)")
    # a real cluster (contimg cluster, contimg.cluster): the telescope's node list
    nodes: tuple[str, ...] = setting((), "the nodes: 'name=incoming directory' per Dask "
                                     "worker (placement 'nodes' reads a file on its node)")
    worker_threads: int = setting(2, "threads of each worker `contimg cluster` starts",
                                  flags=("--worker-threads",))
    worker_port: int = setting(0, "port of the first worker `contimg cluster up` starts (the "
                               "next ones count up; fixed ports keep a worker's address "
                               "when its nanny restarts it); 0: any",
                               flags=("--worker-port",))
    no_workers_timeout: float = setting(60.0, "seconds a read waits for the only worker "
                                        "holding its file before the group fails",
                                        flags=("--no-workers-timeout",))
    task_log: Path | None = setting(None, "directory where each worker appends its task "
                                    "records (stage, group, seconds, CPU seconds)",
                                    flags=("--task-log",), metavar="DIR")
    run_dir: Path = setting(Path("state/cluster"), "where `contimg cluster up` keeps its "
                            "process ids and logs", flags=("--run-dir",), metavar="DIR")

    def _check(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        for entry in self.nodes:
            name, sep, where = entry.partition("=")
            if not sep or not name.strip() or not where.strip():
                raise ValueError(f"nodes: {entry!r} is not 'name=incoming directory'")


@dataclass(frozen=True)
class StreamSettings(_Section):
    """The streaming service (see :mod:`contimg.stream`); defaults suit the telescope."""

    n_subbands: int = setting(16, "subbands per group", flags=("--subbands",))
    tolerance_s: float = setting(60.0, "file-name timestamps of one group differ by at "
                                 "most this (s)", flags=("--tolerance",))
    poll_s: float = setting(2.0, "polling period, s (filesystem notifications wake it "
                            "earlier)", flags=("--poll",))
    settle_s: float = setting(3.0, "a file is complete once its size was stable this long "
                              "(s) and its HDF5 header opens", flags=("--settle",))
    bad_file_grace_s: float = setting(60.0, "a stable file whose header does not open this "
                                      "long is bad (s)", flags=("--bad-file-grace",))
    group_timeout_s: float = setting(600.0, "an incomplete group waits this long after its "
                                     "first file (s), then the incomplete policy applies",
                                     flags=("--group-timeout",))
    incomplete: str = setting("process", "incomplete group after the timeout: process it "
                              "with the missing subbands flagged (if at least min_subbands) "
                              "or fail it", flags=("--incomplete",),
                              choices=("process", "fail"))
    min_subbands: int = setting(12, "fewest subbands the 'process' policy accepts (at "
                                "most n_subbands when not set)",
                                flags=("--min-subbands",))
    in_flight: int = setting(2, "groups processed at once", flags=("--in-flight",))
    image_slots: int = setting(1, "image stages run at once (imaging a full group needs "
                               "~3.5 GB)", flags=("--image-slots",))
    image_mgain: float = setting(0.9, "major-cycle gain of the stream's quick-look images "
                                 "(one major cycle fewer than [image] mgain's 0.8, same "
                                 "residual noise on a full group)")
    max_retries: int = setting(2, "failed attempts of a group re-queued before it is failed",
                               flags=("--max-retries",))
    stale_after_s: float = setting(1800.0, "an in-progress group whose owner is gone, or "
                                   "silent this long (s), goes back to pending",
                                   flags=("--stale-after",))
    skip: frozenset[str] = setting(frozenset(), "stages not to run (comma-separated on the "
                                   "command line)", flags=("--skip",),
                                   choices=STAGES, metavar="STAGE,...")
    placement: str = setting("any", "which worker reads which file: 'any' (shared disk), "
                             "'discover' (ask the workers), 'nodes' ([dask] nodes) or a "
                             "JSON file {worker: [dirs]}",
                             flags=("--placement",))
    flag_in_convert: bool = setting(True, "flag while converting (placement 'any')")
    calibration_wait_s: float = setting(900.0, "apply waits this long at most for a "
                                        "calibrator group in flight to solve (s)")
    status_every_s: float = setting(30.0, "period of the queue summary in the log (s)")
    use_notifications: bool = setting(True, "watch the incoming directory with filesystem "
                                      "notifications (polling stays the safety net)")
    collecting_timeout_s: float = setting(3600.0, "housekeeping fails collecting groups "
                                          "older than this (s)",
                                          flags=("--collecting-timeout",))
    tmp_age_hours: float = setting(6.0, "housekeeping removes temporary outputs older than "
                                   "this even if their process may live",
                                   flags=("--tmp-age-hours",))
    memory_limit: str = setting("auto", "memory budget of the groups in flight: 'auto' (the "
                                "Dask workers' memory limit), 'off', or a size such as "
                                "'6GiB' (see contimg.admission)", flags=("--memory-limit",),
                                metavar="SIZE")
    memory_per_visibility: float = setting(30.0, "bytes reserved per visibility of a group "
                                           "in flight (measured, bench/memory.py: the "
                                           "stream's peak on a full group, 4.70 GiB / "
                                           "171.6 M = 29.4)")

    def _check(self):
        if "convert" in self.skip:
            raise ValueError("skip convert: every later stage needs the MS")
        if not 1 <= self.min_subbands <= self.n_subbands:
            raise ValueError(f"min_subbands={self.min_subbands}: must be 1..{self.n_subbands}")
        for name in ("in_flight", "image_slots", "n_subbands"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        from contimg.admission import parse_bytes

        parse_bytes(self.memory_limit)          # a clear error now, not in the stream
        if self.memory_per_visibility < 0:
            raise ValueError(f"memory_per_visibility must be >= 0, got "
                             f"{self.memory_per_visibility}")


@dataclass(frozen=True)
class FlagConfig(_Section):
    """The RFI flagger: the keys of :class:`graphs.flag.FlagStrategy` in ``[flag]``, and
    optionally a strategy file whose keys override them (``contimg flag --strategy``)."""

    strategy_file: Path | None = setting(None, "flagging strategy: a TOML file of "
                                         "graphs.flag.FlagStrategy keys (top level or a "
                                         "[flag] table)", flags=("--strategy", "--flag-strategy"),
                                         metavar="FILE")
    #: every FlagStrategy key with its value, in its order (complete after construction)
    options: tuple = field(default=(), metadata={"internal": True})

    def _check(self):
        st = _flag_strategy_class()(**dict(self.options))
        object.__setattr__(self, "options", tuple(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in st.to_dict().items()))

    @property
    def strategy(self):
        """The flagger's :class:`graphs.flag.FlagStrategy` (a fresh copy)."""
        return _flag_strategy_class()(**dict(self.options))

    def __getattr__(self, name):   # cfg.flag.threshold, ...
        opts = dict(object.__getattribute__(self, "options"))
        if name in opts:
            return opts[name]
        raise AttributeError(name)


@dataclass(frozen=True)
class CalibrateConfig(_Section):
    """Calibrator matching, solving and applying."""

    catalog: str | None = setting(None, "calibrator list: CSV, SQLite or VLA list format "
                                  "(default: the built-in Perley-Butler 2017 list)",
                                  env="VLA_CATALOG", flags=("--catalog",), metavar="FILE")
    match_radius_deg: float = setting(1.5, "calibrators within this of the pointing "
                                      "declination match (deg; half the beam FWHM)",
                                      env="CAL_MATCH_RADIUS_DEG")
    match_topn: int = setting(3, "the brightest this many matches are kept",
                              env="CAL_MATCH_TOPN")
    pointing_dec_deg: float | None = setting(None, "pointing declination (deg) when the data "
                                             "do not say (default 54.57)",
                                             env="PIPELINE_POINTING_DEC_DEG")
    refant: int | None = setting(None, "reference antenna (default: chosen automatically)",
                                 flags=("--refant",))
    gain_interval: int = setting(1, "integrations per gain solution",
                                 flags=("--gain-interval",))
    gain_mode: str = setting("ap", "gains: amplitude+phase (ap) or phase only (p)",
                             flags=("--gain-mode",), choices=("ap", "p"))
    min_snr: float = setting(3.0, "flag solutions below this SNR", flags=("--min-snr",))
    validity_hours: float = setting(12.0, "a calibration set is valid this long either side "
                                    "of the calibrator's transit (h)")
    interp: str = setting("linear", "apply: interpolation of the solutions in time",
                          flags=("--interp",), choices=("linear", "nearest"))
    apply_flag: bool = setting(True, "apply: flag samples whose solutions are flagged",
                               flags=("--no-flag",))
    field: str | None = setting(None, "calibrate/apply: only this field of the MS (a FIELD "
                                "id or name; default every field)", flags=("--field",),
                                metavar="FIELD")

    def _check(self):
        if self.match_topn < 1:
            raise ValueError(f"match_topn must be >= 1, got {self.match_topn}")


@dataclass(frozen=True)
class ImageConfig(_Section):
    """Continuum imaging (the keywords of :func:`contimg.imaging.image_dataset`, whose
    docstring says what each does, plus ``data_column`` and ``workers`` of
    ``contimg image``)."""

    npix: int = setting(2048, "image size in pixels (square, even)", env="IMG_IMSIZE",
                        flags=("--size", "--imsize"))
    cell_arcsec: float = setting(6.0, "pixel size, arcsec", flags=("--cell",))
    weighting: str = setting("briggs", "visibility weighting", flags=("--weighting",),
                             choices=("natural", "uniform", "briggs"))
    robust: float = setting(0.0, "Briggs robust parameter", env="IMG_ROBUST",
                            flags=("--robust",))
    epsilon: float = setting(1e-4, "gridding accuracy (< 1e-5 runs in double precision)",
                             flags=("--epsilon",))
    niter: int = setting(1000, "maximum CLEAN components (0: dirty image only)",
                         env="IMG_NITER", flags=("--niter",))
    threshold: float = setting(0.0, "absolute CLEAN threshold, Jy (or e.g. 0.5mJy)",
                               env="IMG_THRESHOLD", flags=("--threshold",),
                               parse=parse_threshold)
    auto_threshold_sigma: float = setting(3.0, "CLEAN down to this many times the residual's "
                                          "robust rms (0: off)", flags=("--auto-threshold",))
    algorithm: str = setting("clark", "CLEAN minor cycles", flags=("--algorithm",),
                             choices=("clark", "hogbom"))
    gain: float = setting(0.1, "CLEAN loop gain", flags=("--gain",))
    mgain: float = setting(0.8, "major-cycle gain (contimg image and library calls; the "
                           "stream uses [stream] image_mgain)", flags=("--mgain",))
    max_major: int = setting(10, "at most this many major cycles")
    clark_patch: int | None = setting(None, "half-size of the Clark PSF patch, pixels "
                                      "(default npix/8, >= 32)")
    gridder: str = setting("contimg", "gridder (ducc0: for comparison)", flags=("--gridder",),
                           choices=("contimg", "ducc0"))
    nthreads: int = setting(1, "threads per gridding task", flags=("--threads",))
    grid_tasks: int | None = setting(None, "gridding tasks per image (default: the "
                                     "scheduler's thread count)")
    persist: bool = setting(True, "keep the Stokes I visibilities in memory between major "
                            "cycles")
    pb_cutoff: float = setting(0.1, "primary-beam level below which the PB-corrected image "
                               "is NaN")
    double: bool = setting(False, "grid in double precision")
    uv_min_lambda: float = setting(0.0, "image only baselines at least this long "
                                   "(wavelengths)")
    uv_max_lambda: float | None = setting(None, "image only baselines at most this long "
                                          "(wavelengths)")
    psf_wterm: bool = setting(False, "make the PSF with the w term")
    mask_radius_arcsec: float = setting(60.0, "CLEAN mask radius around mask_sources, "
                                        "arcsec")
    average: bool = setting(True, "baseline-dependent averaging within smear_loss (off: "
                            "grid every visibility)", flags=("--no-average",))
    smear_loss: float = setting(0.01, "largest amplitude loss from averaging at the smear "
                                "radius", flags=("--smear-loss",))
    smear_radius_deg: float | None = setting(None, "where the smearing loss is budgeted, deg "
                                             "(default: the primary beam's half-power radius "
                                             "or the image's half-width, the smaller)",
                                             flags=("--smear-radius",))
    w_mode: str = setting("auto", "w term: snapshot (2-D in the baselines' plane), wstack "
                          "(exact) or auto (the snapshot when it loses at most w_loss)",
                          flags=("--w-mode",), choices=W_MODES)
    w_loss: float = setting(3e-3, "the snapshot's loss budget for w_mode auto",
                            flags=("--w-loss",))
    data_column: str | None = setting(None, "MS column (default CORRECTED_DATA if present, "
                                      "else DATA)", flags=("--data-column",))
    workers: int = setting(0, "contimg image: local Dask worker processes (0: threads in "
                           "this process)", flags=("--workers",))
    uvw_source: str = setting("recompute", "UVW of the re-phasing: recompute (from antenna "
                              "positions and times, both ends) or stored (the MS's, rotated)",
                              flags=("--uvw-source",), choices=("recompute", "stored"))
    uvw_tolerance_m: float = setting(1e-3, "warn (log, image QA, FITS UVWOK) when stored "
                                     "and recomputed UVW differ by more, m")
    field: str | None = setting(None, "contimg image: the field to image: of an MS by FIELD "
                                "name or id, of a UVH5 file by phase centre name or index",
                                flags=("--field",), metavar="FIELD")
    spill: bool = setting(True, "keep the averaged visibilities between major cycles in a "
                          "compact store on disk, not in memory", flags=("--no-spill",))

    def _check(self):
        if self.npix < 16 or self.npix % 2:
            raise ValueError(f"npix must be even and >= 16, got {self.npix}")
        if not self.cell_arcsec > 0:
            raise ValueError(f"cell_arcsec must be positive, got {self.cell_arcsec}")

    def dataset_options(self) -> dict:
        """The keywords of ``image_dataset`` (everything but data_column and workers)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("data_column", "workers", "field")}


@dataclass(frozen=True)
class ScienceConfig(_Section):
    """Science products: photometry, variability, mosaics."""

    photometry_pb_cut: float = setting(0.2, "forced photometry only where the primary beam "
                                       "is above this", flags=("--pb-cut",))
    match_radius_arcsec: float = setting(10.0, "catalogue cross-match radius, arcsec",
                                         flags=("--match-radius",))
    ese_preset: str = setting("default", "extreme-scattering-event detection preset",
                              flags=("--preset",),
                              choices=("conservative", "default", "sensitive"))
    mosaic_hour_utc: int | None = setting(None, "hour (UTC) the nightly mosaic is built",
                                          env="SCHED_MOSAIC_HOUR_UTC")
    reference_min_snr: float = setting(20.0, "reference sources need at least this SNR",
                                       flags=("--reference-min-snr",))

    def _check(self):
        if self.mosaic_hour_utc is not None and not 0 <= self.mosaic_hour_utc <= 23:
            raise ValueError(f"mosaic_hour_utc must be 0..23, got {self.mosaic_hour_utc}")


@dataclass(frozen=True)
class AppConfig(_Section):
    """The operators' app (Panel pages and REST API)."""

    address: str = setting("127.0.0.1", "address the app listens on", flags=("--address",))
    port: int = setting(5006, "port the app listens on", flags=("--port",))
    scheduler: str = setting("", "Dask scheduler the app shows ('': dask.scheduler)",
                             flags=("--scheduler",), metavar="ADDRESS")
    dashboard_url: str = setting("", "Dask dashboard URL linked from the app",
                                 flags=("--dashboard-url",), metavar="URL")
    cookie_secret: str = setting("", "secret that signs the app's cookies",
                                 env="CONTIMG_APP_COOKIE_SECRET")
    oauth_provider: str = setting("", "OAuth provider ('': local accounts)")
    oauth_key: str = setting("", "OAuth client key")
    oauth_secret: str = setting("", "OAuth client secret")
    login_max_failures: int = setting(5, "failed logins before the back-off starts")
    login_backoff_s: float = setting(1.0, "back-off after failed logins, s (doubles)")


SECTIONS: dict[str, type] = {
    "paths": PathsConfig, "dask": DaskConfig, "stream": StreamSettings, "flag": FlagConfig,
    "calibrate": CalibrateConfig, "image": ImageConfig, "science": ScienceConfig,
    "app": AppConfig,
}


@dataclass(frozen=True)
class Config:
    """The effective configuration; ``provenance`` maps ``"section.field"`` to where its
    value came from (not part of equality)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    dask: DaskConfig = field(default_factory=DaskConfig)
    stream: StreamSettings = field(default_factory=StreamSettings)
    flag: FlagConfig = field(default_factory=FlagConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    science: ScienceConfig = field(default_factory=ScienceConfig)
    app: AppConfig = field(default_factory=AppConfig)
    provenance: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def items(self):
        """``("section.field", value)`` for every setting, in order."""
        for name in SECTIONS:
            for key, value in _section_items(self, name):
                yield f"{name}.{key}", value


def _spec(section: str, name: str, where: str) -> _Spec:
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section [{section}]{_suggest(section, SECTIONS)}"
                          f"; sections: {', '.join(SECTIONS)}")
    specs = dict(_own_specs(SECTIONS[section]))
    if section == "flag":
        specs.update(_strategy_specs())
    if name not in specs:
        raise ConfigError(f"{where}: unknown key {name!r} in [{section}]"
                          f"{_suggest(name, specs)}")
    return specs[name]


def _section_items(cfg: Config, name: str):
    sec = getattr(cfg, name)
    for spec in _own_specs(type(sec)).values():
        yield spec.name, getattr(sec, spec.name)
    if name == "flag":
        yield from sec.options
