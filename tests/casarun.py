"""CASA (casatools / casatasks) for the interop tests: every script runs in a subprocess
(casatools bundles its own casacore, which must not meet python-casacore's in one
process) with a site config that keeps CASA offline (``conftest.casa_site_config``).

* :func:`run_casa` runs a script with arguments in a work directory.
* :func:`casa_solve` runs CASA's ``bandpass`` / ``gaincal`` in the sequence ours uses
  (B0, phase per integration, B with it, G (ap) with B).
* :func:`casa_applycal` runs ``applycal`` with a list of tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_casa(workdir, script, *args, name="casa_script.py"):
    """Write ``script`` to ``workdir/name`` and run it with ``args`` (made strings) in
    ``workdir``; an AssertionError with CASA's output tail when it fails."""
    from conftest import casa_site_config

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    site = casa_site_config(workdir)
    path = workdir / name
    path.write_text(script)
    env = dict(os.environ, CASASITECONFIG=str(site))
    res = subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True,
                         text=True, env=env, timeout=600, cwd=str(workdir))
    if res.returncode != 0:
        raise AssertionError(f"CASA failed ({path}):\n{res.stdout[-3000:]}\n"
                             f"{res.stderr[-3000:]}")
    return res


SOLVE = """
import json, sys
from casatasks import gaincal, bandpass
vis, pre, refant = sys.argv[1:4]
o = json.loads(sys.argv[4])
kw = dict(vis=vis, refant=refant, field=o["field"], combine=o["combine"])
# the first two steps: unflagged when only the final tables are to be flagged (as ours)
snr0 = o["minsnr"] if o["flag_all_steps"] else 0.0
bandpass(caltable=pre + ".B0", solint="inf", bandtype="B", solnorm=False, minsnr=snr0,
         **kw)
gaincal(caltable=pre + ".Gp", solint="int", calmode="p", gaintype="G", minsnr=snr0,
        gaintable=[pre + ".B0"], **kw)
bandpass(caltable=pre + ".B", solint="inf", bandtype="B", solnorm=False,
         minsnr=o["minsnr"], gaintable=[pre + ".Gp"], **kw)
if o["gains"]:
    gaincal(caltable=pre + ".G", solint="int", calmode="ap", gaintype="G",
            minsnr=o["minsnr"], gaintable=[pre + ".B"], **kw)
"""


def casa_solve(workdir, ms, prefix, refant, *, field="", combine="", minsnr=3.0,
               gains=True, flag_all_steps=True):
    """CASA's solutions on ``ms``: tables ``<prefix>.B`` (and ``.G`` when ``gains``), with
    ``<prefix>.B0`` / ``.Gp`` the intermediate steps; ``field`` a CASA field selection
    ("" every field), ``combine`` CASA's (e.g. "field,scan")."""
    opts = dict(field=str(field), combine=combine, minsnr=float(minsnr), gains=gains,
                flag_all_steps=flag_all_steps)
    run_casa(workdir, SOLVE, ms, prefix, refant, json.dumps(opts), name="casa_solve.py")


APPLY = """
import json, sys
from casatasks import applycal
vis, tabs, interp = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
kw = {} if interp is None else dict(interp=interp)
applycal(vis=vis, gaintable=tabs, calwt=False, flagbackup=False, **kw)
"""


def casa_applycal(workdir, ms, tables, interp=None):
    """CASA's ``applycal`` of ``tables`` to ``ms`` (CORRECTED_DATA); ``interp`` CASA's
    per-table list (None: CASA's default)."""
    run_casa(workdir, APPLY, ms, json.dumps([str(t) for t in tables]), json.dumps(interp),
             name="casa_apply.py")
