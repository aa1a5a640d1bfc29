"""RFI flagging kernels (numba): numpy arrays in, numpy arrays out; no I/O, no dask.

The layout is the one a baseline block of the visibility Dataset gives:
``vis[time, baseline, frequency, polarization]``. :func:`flag_block` walks the
(baseline, polarization) time-frequency planes with strides (one small per-plane
scratch of amplitudes, no repacking pass over the block) and runs, per plane:

1. **missing data**: the input FLAG, NaN/inf and exact-zero visibilities
   (:func:`flag_nonfinite_zero`). Missing samples never enter a statistic.
2. **iterations** ``k = 0 .. n_iter-1`` with a threshold factor
   ``step ** (n_iter - 1 - k)`` (e.g. 2, 1; AOFlagger's default strategy uses 4, 2, 1):

   a. a robust smooth **background** of the amplitude plane: a masked (normalised)
      separable Gaussian low-pass in time and frequency (:func:`masked_gaussian_smooth`)
      of the unflagged samples. Autocorrelations first get a rank-1 model ``G(t) B(f)``
      (:func:`rank1_background`: ``B`` by medians over time, ``G`` a clipped quadratic
      in time), which follows bandpass ripples and gain drifts where a Gaussian would
      leave residuals of many sigma (autos carry ~1e3 times more signal than noise);
      their remaining background is smoothed along time only (optionally locally
      linear in time, ``linear_mode``, which has no bias at the first/last integration
      under a drift but is levered by outliers near the edge);
   b. a **noise scale per channel**: 1.4826 x median over time of ``|residual|``,
      smoothed across frequency by a running median (:func:`channel_noise`), so a
      frequency-dependent noise level (bandpass) does not bias the thresholds;
   c. **SumThreshold** (Offringa et al. 2010) on the normalised residual
      ``z = (amp - background) / sigma(f)``, in time and in frequency, windows
      ``M = 1, 2, 4, ...`` with thresholds ``chi_M = chi_1 * factor / rho**log2(M)``
      (:func:`sumthreshold_2d`). As in AOFlagger, samples already flagged are left out
      of a window's mean, and a window whose mean of unflagged samples exceeds its
      threshold flags all its samples. Optionally (``scale_by_count``, our default in
      ``graphs.flag``) a window holding ``c`` unflagged samples is held to ``chi_c``
      rather than ``chi_M``, which stops long windows from flagging the clean samples
      next to strong RFI.

3. **MAD clipping** of the last normalised residual: ``|z| > k`` (two-sided; positive
   side only for autocorrelations, whose rank-1 bandpass can absorb a persistent line),
   where z is already in units of 1.4826 x MAD per channel (:func:`mad_clip` is the
   per-plane version, for standalone use).
4. **SIR dilation** (scale-invariant rank operator, Offringa et al. 2012) in time then
   in frequency, linear-time prefix-sum algorithm, with the missing samples left out of
   the sequences (AOFlagger's "masked" variant, so that a dead subband is not grown
   into its neighbours; :func:`sir_dilate_2d`).
5. per baseline (after OR-ing the polarisations), **whole channel / whole
   integration** flagging when their fraction of new flags among the available samples
   exceeds a threshold (:func:`extend_by_fraction`).

:func:`flag_block` returns uint8 codes (0 ok, 1 new flag, 2 missing), so that the
array-wide statistics count new flags among available data in the same pass; once
counted, a block's codes are kept as one bit per sample (:func:`pack_codes`, whose
result :func:`combine_packed` combines with the array-wide decisions).

Antenna-wide and array-wide decisions need every baseline and are made in
``graphs.flag`` from small per-plane statistics (:func:`plane_noise`,
:func:`antenna_flags`).

All numba functions are ``@njit(nogil=True, cache=True)``; they are serial and meant
to be run in parallel by dask threads (one baseline block per task).

Implementation and cost
-----------------------
A DSA-110 group is 9312 planes of 24 x 768; the kernels are written so that every
step gives exactly (bit for bit) the result of the plain algorithm described above,
at a fraction of its cost (~2.8x less CPU for :func:`flag_block` than the
sequence-by-sequence version; checked on a full simulated group):

* SumThreshold (:func:`_sumthreshold_2d_inplace`, :func:`_st_pass`) runs every
  sequence of a direction at once: the masked values are laid out once per call in
  (time, frequency) and (frequency, time) order, the running sum of each lane is the
  same sequence of float64 additions as one sequence at a time, and the count of
  unflagged samples of a window (hence its threshold) is updated only where a flagged
  sample enters or leaves it, so the dense loop over lanes vectorises. The frequency
  pass of M = 1 is skipped after the time pass of M = 1 (it cannot find anything
  more when the values are finite).
* Channel noise (:func:`_column_abs_medians`): the 24-sample medians of all channels
  come from one sorting network applied across channels (flagged samples as +inf);
  the band-wide median is only computed when a window needs it.
* Medians of many samples (:func:`plane_noise`) use an exact bucket select
  (:func:`_median_bucket`) instead of a quickselect over everything.
* The Gaussian background sums four taps per sweep over a row (partial sums in
  registers, same order of additions) on zero-padded rows (exact zeros), and the
  smoothed weights of a mask are reused when the next plane's first iteration has
  the same mask (the missing data, usually none).
* SIR along time runs all channels without missing samples at once.
* One set of scratch arrays per block, shared between stages that never overlap, so
  that a plane's working set stays in cache.

Modules: :mod:`.robust` (medians, selection, MAD clipping), :mod:`.sumthreshold`,
:mod:`.dilation` (SIR, whole channels / integrations), :mod:`.background` (smoothing,
rank-1 background, channel noise), :mod:`.plane` (the strategy over one plane and one
block), :mod:`.statistics` (counts and antenna-wide decisions).
"""

from kernels.flagging.background import channel_noise, masked_gaussian_smooth, rank1_background
from kernels.flagging.dilation import extend_by_fraction, sir_dilate_1d, sir_dilate_2d
from kernels.flagging.plane import (
    CODE_MISSING,
    CODE_OK,
    CODE_RFI,
    flag_block,
    flag_nonfinite_zero,
    flag_plane,
)
from kernels.flagging.robust import MAD_TO_SIGMA, mad_clip
from kernels.flagging.statistics import (
    antenna_flags,
    code_counts_baseline,
    code_counts_tf,
    combine_codes,
    combine_packed,
    flag_counts,
    pack_codes,
    plane_noise,
)
from kernels.flagging.sumthreshold import sumthreshold_1d, sumthreshold_2d

__all__ = [
    "MAD_TO_SIGMA",
    "flag_nonfinite_zero",
    "sumthreshold_1d",
    "sumthreshold_2d",
    "sir_dilate_1d",
    "sir_dilate_2d",
    "mad_clip",
    "masked_gaussian_smooth",
    "rank1_background",
    "channel_noise",
    "extend_by_fraction",
    "flag_plane",
    "flag_block",
    "CODE_OK",
    "CODE_RFI",
    "CODE_MISSING",
    "plane_noise",
    "antenna_flags",
    "code_counts_baseline",
    "code_counts_tf",
    "combine_codes",
    "combine_packed",
    "pack_codes",
    "flag_counts",
]
