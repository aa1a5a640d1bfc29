"""Keep astropy offline: no IERS downloads, and no failure once the table is old.

python-casacore ships its own measures data; astropy must be told to use its bundled
IERS tables without trying to refresh them (the telescope and CI have no network).
"""

from astropy.utils import iers

iers.conf.auto_download = False
iers.conf.auto_max_age = None
