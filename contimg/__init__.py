"""contimg: the DSA-110 continuum imaging pipeline."""

from __future__ import annotations

__version__ = "0.1.0"

from contimg import _daskconfig  # noqa: F401  (worker malloc settings, see there)
from contimg import _offline  # noqa: F401  (keeps astropy from reaching the network)
