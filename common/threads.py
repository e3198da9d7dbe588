"""Thread names as the OS shows them (``ps -L``, ``top -H``, ``/proc/PID/task/TID/comm``).

A new thread inherits its creator's name, so each long-lived thread names itself, as QEMU's
qemu_thread_create and Linux's kthread_create name theirs; the benchmark finds its stages
by these names.
"""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15
_libc = ctypes.CDLL(None)


def set_thread_name(name: str) -> None:
    """The calling thread's OS name (15 bytes at most)."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
