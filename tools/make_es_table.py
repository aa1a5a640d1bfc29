"""Regenerate ``kernels/gridding/_es_table.py``: optimal (beta, e0) of the gridding kernel per (W, sigma).

For every support W in 4..12 (by default) and oversampling sigma in 1.20..2.50 (step 0.05) this
minimises the RMS 1-D aliasing error ``kernels.gridding.kernel_error`` of the
kernel ``exp(beta ((1 - z^2)^e0 - 1))`` over (beta / W, e0) with Nelder-Mead, and writes
the table the gridder chooses its kernel from. Takes ~10 minutes on one core.

    PYTHONPATH=. python tools/make_es_table.py [--out kernels/gridding/_es_table.py]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from kernels.gridding import kernel_error


def optimise(W, sigma, x0):
    def f(p):
        if not (0.5 < p[0] < 4.0 and 0.3 < p[1] < 0.8):
            return 1e3
        return float(np.log(kernel_error(W, sigma, p[0] * W, p[1])))

    r = minimize(f, x0, method="Nelder-Mead", options=dict(xatol=1e-4, fatol=1e-4))
    return float(np.exp(r.fun)), float(r.x[0]), float(r.x[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "kernels"
                                         / "gridding" / "_es_table.py"))
    ap.add_argument("--wmax", type=int, default=12)
    args = ap.parse_args(argv)
    rows = []
    t0 = time.time()
    for W in range(4, args.wmax + 1):
        x0 = np.array([2.0, 0.52])
        for sigma in np.round(np.arange(1.20, 2.5001, 0.05), 2):
            err, bw, e0 = optimise(W, float(sigma), x0)
            x0 = np.array([bw, e0])
            rows.append((W, float(sigma), err, bw, e0))
            print(f"W={W:2d} sigma={sigma:.2f} eps1d={err:.3e} beta/W={bw:.5f} e0={e0:.5f}"
                  f"  [{time.time() - t0:.0f}s]", flush=True)
    write(rows, args.out)


def write(rows, out):
    lines = [
        '"""Gridding kernels: (W, sigma, eps1d, beta / W, e0), made by tools/make_es_table.py.',
        "",
        "Kernel ``phi(z) = exp(beta ((1 - z^2)^e0 - 1))`` on ``|z| < 1`` with support ``W``",
        "cells, at oversampling ``sigma``; ``eps1d`` is its RMS relative 1-D aliasing error",
        "(``kernels.gridding.kernel_error``), with (beta, e0) minimising it.",
        '"""',
        "",
        "ES_KERNELS = (",
    ]
    for W, s, e, b, e0 in rows:
        lines.append(f"    ({W}, {s:.2f}, {e:.6e}, {b:.10f}, {e0:.10f}),")
    lines.append(")")
    Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
