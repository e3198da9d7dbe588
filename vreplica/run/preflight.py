"""Checks of a command's input made before anything starts: numbers, and the paths and
ports it will use.

A file the run writes at its end (``--trace``, ``--summary-json``, ...) or a host port it
binds (``--hostfwd``) is checked here, so that a run that could not finish its work is
refused at once, in one line, instead of failing after it has run. Nothing is created.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import stat
from pathlib import Path


class UsageError(Exception):
    """Bad input: the message is the one line the user sees (exit status 2)."""


def finite_float(text: str) -> float:
    """A number that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _refused(option: str, path: str | Path, code: int,
             what: str | Path | None = None) -> UsageError:
    where = f" ({what})" if what is not None and str(what) != str(path) else ""
    return UsageError(f"{option} {path}: {os.strerror(code)}{where}")


def _stat(option: str, path: str | Path, p: Path) -> os.stat_result | None:
    """``p``'s status, None if it does not exist; refused if it cannot be looked at."""
    try:
        return p.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _refused(option, path, e.errno or errno.EACCES, p) from None


def writable_file(option: str, path: str | Path) -> None:
    """``path`` can be written as a file: it is not a directory, its directory exists and it
    (or the file already there) may be written."""
    p = Path(path)
    st = _stat(option, path, p)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise _refused(option, path, errno.EISDIR)
    parent = p.parent
    pst = _stat(option, path, parent)
    if pst is None:
        raise UsageError(f"{option} {path}: no such directory {parent}")
    if not stat.S_ISDIR(pst.st_mode):
        raise _refused(option, path, errno.ENOTDIR, parent)
    if st is not None:
        if not os.access(p, os.W_OK):
            raise _refused(option, path, errno.EACCES)
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise _refused(option, path, errno.EACCES, f"directory {parent}")


def writable_dir(option: str, path: str | Path) -> None:
    """``path`` is, or can be made as, a directory that takes new files: it is a writable
    directory, or its nearest existing ancestor is one."""
    p = Path(path).absolute()
    probe = p
    while (st := _stat(option, path, probe)) is None:
        probe = probe.parent
    if not stat.S_ISDIR(st.st_mode):
        raise _refused(option, path, errno.ENOTDIR, probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise _refused(option, path, errno.EACCES, probe)


def udp_port_free(option: str, port: int, host: str = "127.0.0.1") -> None:
    """Nothing holds UDP ``host:port`` (0: any free port will do)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"{option}: host port {port} on {host} is not free "
                             f"({e.strerror})") from None
