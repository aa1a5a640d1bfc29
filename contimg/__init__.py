"""contimg: the DSA-110 continuum imaging pipeline.

Importing contimg changes no global state: the process settings it needs (dask, astropy
offline, HDF5 locking) are applied by :func:`contimg.runtime.configure`, which the
command line, the stream and Dask worker preloads call; the configuration is
:mod:`contimg.config`.
"""

from __future__ import annotations

__version__ = "0.1.0"
