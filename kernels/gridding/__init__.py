"""w-stacking gridder and degridder (numba), accuracy chosen by one parameter epsilon.

Conventions (identical to ``ducc0.wgridder.vis2dirty`` / ``dirty2vis`` so the two can be
compared 1:1):

* image pixel ``(ix, iy)`` sits at ``l = (ix - npix_x/2) * pixsize_x``,
  ``m = (iy - npix_y/2) * pixsize_y``; ``n - 1 = -(l^2 + m^2) / (sqrt(1 - l^2 - m^2) + 1)``;
* ``vis2dirty``:  ``I(l, m) = sum_k wgt_k Re[V_k exp(+2 pi i (u_k l + v_k m - w_k (n-1)))] / n``
  (u, v, w in wavelengths = metres * freq / c; the ``/ n`` only with w-stacking and
  ``divide_by_n``; without w-stacking the w term is dropped and n = 1);
* ``dirty2vis`` is the exact adjoint:
  ``V_k = wgt_k sum_lm I(l, m) exp(-2 pi i (u_k l + v_k m - w_k (n-1))) / n``.

``flip_u/flip_v/flip_w`` negate the corresponding coordinate, as in ducc0; with
``flip_w=True`` the phase reads ``u l + v m + w (n-1)``, the convention
``kernels.predict`` uses for the pipeline's data (``V = sum S exp(+2 pi i (ul+vm+w(n-1)))``).

Algorithm (Arras et al. 2021, "Efficient wide-field radio interferometry response";
Ye et al. 2021 "improved w-stacking"):

* a "generalised exponential of semicircle" kernel
  ``phi(z) = exp(beta ((1 - z^2)^e0 - 1))`` on ``|z| < 1`` (``e0 = 1/2`` is the classic ES
  kernel of Barnett et al. 2019; letting ``e0`` float to ~0.52 buys a factor 2-3 in
  accuracy at the same support). Support ``W``, oversampling ``sigma``, ``beta`` and
  ``e0`` come from a table optimised offline (``kernels/gridding/_es_table.py``, made by
  ``tools/make_es_table.py``) that lists each kernel's RMS 1-D aliasing error; the
  relative L2 error of the image is ``sqrt(ndim)`` times it (ndim = 3 with w-stacking;
  checked against direct transforms to ~15 %), and a kernel is eligible when twice that
  is at most ``epsilon``. Among eligible kernels a cost model (gridding ~ nvis W^3,
  FFT ~ nplanes * grid log grid) picks the cheapest;
* the kernel is evaluated as one polynomial per tap interval (Horner, all taps at once,
  degree ~W-2, the lowest that keeps the polynomial kernel's own aliasing error within
  10 % of the exact kernel's); the tap loops are generated per lane count
  (``kernels/gridding/_loops.py``, made by ``tools/gen_gridding_loops.py``) and compiled
  with LLVM's SLP vectoriser (AVX2);
* w-stacking treats w as a third NUFFT dimension: each visibility is spread over ``W``
  w-planes with the same kernel, each plane is FFT'd (only the columns that carry data
  in that plane, then only the rows the image needs), multiplied by the screen
  ``exp(-2 pi i w_plane (n - 1 + nshift))`` and accumulated; the image is then divided by
  the Fourier transform of the (polynomial) kernel in u, v and w (the latter at
  ``dw (n - 1 + nshift)``), evaluated numerically by Gauss-Legendre quadrature per tap
  interval and stored as a Chebyshev series, and by ``n``;
* visibilities with ``w < 0`` are replaced by their conjugates at ``(-u, -v, -w)`` (the
  image is real), which halves the w range; ``nshift`` re-centres ``n - 1`` so the
  screens oscillate as slowly as possible, halving the number of planes again;
* visibilities are traversed tile by tile: (row, channel-range) runs are sorted by
  (uv tile, first w-plane), each tile is accumulated in a small local buffer and added
  to the grid once; threads take whole tile rows, even rows then odd rows, so no two
  threads ever write the same grid cells (no locks, deterministic results).

Memory grows with the image (one grid of ``nu x nv`` in flight: vis2dirty/dirty2vis grid
and transform one w-plane at a time), not with the number of visibilities, beyond one
working copy of the chunk's visibilities and the index of runs. :func:`grid_chunk`
returns the whole stack ``(nplanes, nu, nv)`` (or a range of planes, ``planes=``), so a
graph can trade memory against passes over the data.

Lower-level API for distributed imaging: :func:`make_plan` fixes every parameter from
global quantities (image geometry, epsilon, the |w| range and uv extent of all the data),
:func:`grid_chunk` grids one chunk onto a stack of w-planes, stacks from chunks add up,
and :func:`grid_to_image` turns a (summed) stack into the dirty image. Their adjoints are
:func:`image_to_grid` and :func:`degrid_chunk`.

Modules: :mod:`.kernel` (kernel design, correction transform, aliasing error),
:mod:`.plan` (cost model, :class:`GridPlan`), :mod:`.index` (runs sorted into uv tiles
and w-planes), :mod:`.visibilities` (preparing and finishing visibilities),
:mod:`.fft` (partial grid FFTs), :mod:`.screens` (w-screens, planes <-> image),
:mod:`.correction` (the image correction), :mod:`.threads` (thread pool, compilation
with the SLP vectoriser), :mod:`.stack` (plan-level building blocks), :mod:`.wgridder`
(:func:`vis2dirty` / :func:`dirty2vis`); :mod:`._loops` is generated.
"""

from kernels.gridding.kernel import kernel_candidates, kernel_error, psihat
from kernels.gridding.plan import (
    SPEED_OF_LIGHT,
    GridPlan,
    make_plan,
    plan_for,
    uv_extent,
    w_range,
)
from kernels.gridding.stack import (
    degrid_chunk,
    grid_chunk,
    grid_to_image,
    image_to_grid,
    make_index,
)
from kernels.gridding.wgridder import dirty2vis, vis2dirty

__all__ = [
    "GridPlan",
    "make_plan",
    "plan_for",
    "w_range",
    "uv_extent",
    "grid_chunk",
    "grid_to_image",
    "image_to_grid",
    "degrid_chunk",
    "vis2dirty",
    "dirty2vis",
    "make_index",
    "kernel_candidates",
    "kernel_error",
    "psihat",
    "SPEED_OF_LIGHT",
]
