"""Products on disk: their permission bits, their directories, and writability up front.

Products (Measurement Sets, calibration tables, FITS images, thumbnails, mosaics) used
to get whatever mode the process's umask gave: under ``umask 000`` every product was
world-writable, under ``umask 077`` nobody in the group could read them. Now:

* ``[paths] product_mode`` (default ``0644``) is the mode of every product file;
  directories (an MS or a caltable is a directory tree) get the same bits plus ``x``
  wherever ``r`` is set (``0644`` → ``0755``). A world-writable mode is refused.
* :func:`finalise` gives a product (a file, or a directory tree) that mode, after its
  temporary was renamed into place.
* :func:`make_dirs` creates product directories with the directory mode.
* :func:`apply_umask` (called by :func:`contimg.runtime.configure`) sets the process
  umask to match, so that what a library writes into a product later (casacore adding a
  column's files to an MS) never comes out more open than the configured mode either.
* :func:`writable_dir` checks that a command can write its output *before* it computes
  anything, and says which directory it cannot write.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile

log = logging.getLogger(__name__)

DEFAULT_FILE_MODE = 0o644


def parse_mode(value) -> int:
    """A product file mode from ``0o640``, ``"0640"``, ``"640"`` or ``"0o640"``; raise
    ValueError unless it is a plain permission mode (no setuid/sticky bits), readable by
    its owner and not world-writable."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r}: not a file mode")
    if isinstance(value, int):
        mode = value
    else:
        text = str(value).strip().lower().removeprefix("0o")
        if not text or any(c not in "01234567" for c in text):
            raise ValueError(f"{value!r}: not an octal file mode (e.g. '0644', '0640')")
        mode = int(text, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{value!r}: not a permission mode 0000..0777 (in TOML write "
                         "an octal mode as a string, '0640', or as 0o640)")
    if mode & stat.S_IWOTH:
        raise ValueError(f"{oct(mode)}: products must never be world-writable (use e.g. "
                         "0644 or 0640)")
    if not mode & stat.S_IRUSR:
        raise ValueError(f"{oct(mode)}: products must be readable by their owner")
    return mode


def dir_mode(file_mode: int) -> int:
    """The directory mode that goes with a file mode: ``x`` wherever ``r`` is set."""
    return file_mode | ((file_mode & 0o444) >> 2)


def product_mode() -> int:
    """The configured ``[paths] product_mode``."""
    from contimg.config import current

    return parse_mode(current().paths.product_mode)


def apply_umask(mode: int | None = None) -> int:
    """Set the process umask so that nothing is created more open than ``mode`` (default
    the configured one) allows; returns the previous umask."""
    mode = product_mode() if mode is None else parse_mode(mode)
    return os.umask(0o777 & ~dir_mode(mode))


def finalise(path, mode: int | None = None):
    """Give the product at ``path`` its mode: a file ``mode``, a directory tree
    :func:`dir_mode` for its directories and ``mode`` for its files (symlinks are left
    alone). Returns ``path``."""
    mode = product_mode() if mode is None else parse_mode(mode)
    dmode = dir_mode(mode)
    p = os.fspath(path)
    denied = []

    def chmod(q, m):
        try:
            os.chmod(q, m)
        except PermissionError:     # not ours (another user's MS we only add to)
            denied.append(q)

    if os.path.islink(p):
        return path
    if not os.path.isdir(p):
        chmod(p, mode)
    else:
        chmod(p, dmode)
        for root, dirs, files in os.walk(p):
            for name, m in [(d, dmode) for d in dirs] + [(f, mode) for f in files]:
                q = os.path.join(root, name)
                if not os.path.islink(q):
                    chmod(q, m)
    if denied:
        log.warning("%s: cannot set the product mode %s of %d entr%s owned by another "
                    "user (e.g. %s)", p, oct(mode), len(denied),
                    "y" if len(denied) == 1 else "ies", denied[0])
    return path


def make_dirs(path, mode: int | None = None):
    """``os.makedirs(path, exist_ok=True)``; the directories it creates get the product
    directory mode (whatever the umask). Returns ``path``."""
    dmode = dir_mode(product_mode() if mode is None else parse_mode(mode))
    p = os.path.abspath(os.fspath(path))
    missing = []
    q = p
    while not os.path.exists(q):
        missing.append(q)
        parent = os.path.dirname(q)
        if parent == q:
            break
        q = parent
    os.makedirs(p, exist_ok=True)
    for d in reversed(missing):
        try:
            os.chmod(d, dmode)
        except FileNotFoundError:   # removed meanwhile by someone else: theirs now
            pass
    return path


def writable_dir(path, what: str = "output directory"):
    """Create ``path`` if needed and check that files can be created and renamed in it
    (a probe file, so read-only mounts, ACLs and root are judged right). Raises
    PermissionError (an OSError: the CLI prints it as one line, exit 2) naming the
    directory; returns ``path``."""
    p = os.path.abspath(os.fspath(path))
    try:
        make_dirs(p)
        fd, probe = tempfile.mkstemp(prefix=".contimg-write-probe-", dir=p)
        os.close(fd)
        os.replace(probe, probe + ".renamed")
        os.unlink(probe + ".renamed")
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise PermissionError(f"{p}: {what} is not writable ({why})") from None
    return path
