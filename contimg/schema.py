"""The visibility Dataset contract, re-exported for ``from contimg import schema``.

It lives in :mod:`graphs.contract`, where every layer can import it; this name keeps
working for notebooks and user code.
"""

from graphs.contract import *  # noqa: F401,F403
from graphs.contract import __all__  # noqa: F401
