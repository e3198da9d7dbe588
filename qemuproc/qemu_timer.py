"""Stands for util/qemu-timer.c: timer lists per clock, their deadlines, and qemu_poll_ns.

A ``QEMUTimerList`` keeps its active timers sorted by expiry; ``timer_mod`` re-inserts a timer
and, when it becomes the list's first, notifies the main loop (``qemu_notify_event``) so that
the next wait is computed against the new deadline. ``main_loop_wait`` sleeps until the
soonest of its timeouts, in nanoseconds (``timerlistgroup_deadline_ns``,
``qemu_soonest_timeout``), in ``qemu_poll_ns``: a real ppoll(2) with a timespec, so a 150 us
timer wakes the loop after about 150 us, not after the next whole millisecond.
Timers are touched under the BQL only (QEMU's active_timers_lock is not needed here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import time
from collections.abc import Callable
from typing import Any

QEMU_CLOCK_REALTIME = 0
QEMU_CLOCK_VIRTUAL = 1
QEMU_CLOCK_MAX = 2
SCALE_MS = 1_000_000
INT32_MAX = 2**31 - 1

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def qemu_clock_get_ns(type_: int) -> int:
    """Both clocks read the host's monotonic clock (under KVM QEMU_CLOCK_VIRTUAL does too,
    less the time the VM spent stopped, which this replica does not subtract)."""
    return time.monotonic_ns()


class QEMUTimer:
    __slots__ = ("expire_time", "timer_list", "cb", "opaque", "name")

    def __init__(self, timer_list: QEMUTimerList, cb: Callable[[Any], None], opaque: Any,
                 name: str) -> None:
        self.expire_time = -1  # -1: not pending
        self.timer_list = timer_list
        self.cb = cb
        self.opaque = opaque
        self.name = name


class QEMUTimerList:
    def __init__(self, clock_type: int, notify_cb: Callable[[int], None]) -> None:
        self.clock_type = clock_type
        self.active_timers: list[QEMUTimer] = []  # sorted by expire_time
        self.notify_cb = notify_cb


class QEMUTimerListGroup:
    """One timer list per clock (main_loop_tlg is the main loop's)."""

    def __init__(self, notify_cb: Callable[[int], None]) -> None:
        self.tl = [QEMUTimerList(t, notify_cb) for t in range(QEMU_CLOCK_MAX)]


PR_SET_TIMERSLACK = 29


def init_clocks(notify_cb: Callable[[int], None]) -> QEMUTimerListGroup:
    """The main loop's timer lists; and a timer slack of 1 ns for this thread (and threads it
    starts later), as QEMU sets: Linux would otherwise let a sleep overrun by up to 50 us."""
    _libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    return QEMUTimerListGroup(notify_cb)


def timer_new_ns(tlg: QEMUTimerListGroup, type_: int, cb: Callable[[Any], None], opaque: Any,
                 name: str = "") -> QEMUTimer:
    return QEMUTimer(tlg.tl[type_], cb, opaque, name or getattr(cb, "__name__", "timer"))


def timer_pending(ts: QEMUTimer) -> bool:
    return ts.expire_time >= 0


def timer_del_locked(timer_list: QEMUTimerList, ts: QEMUTimer) -> None:
    ts.expire_time = -1
    try:
        timer_list.active_timers.remove(ts)
    except ValueError:
        pass


def timer_del(ts: QEMUTimer) -> None:
    if ts.expire_time >= 0:
        timer_del_locked(ts.timer_list, ts)


def timer_mod_ns_locked(timer_list: QEMUTimerList, ts: QEMUTimer, expire_time: int) -> bool:
    """Insert after every timer that expires no later; True if ``ts`` is now the first."""
    expire_time = max(expire_time, 0)
    active = timer_list.active_timers
    i = 0
    while i < len(active) and active[i].expire_time <= expire_time:  # timer_expired_ns
        i += 1
    active.insert(i, ts)
    ts.expire_time = expire_time
    return i == 0


def timer_mod_ns(ts: QEMUTimer, expire_time: int) -> None:
    """(Re)arm ``ts`` for ``expire_time``; wake the loop if its deadline moved earlier."""
    timer_list = ts.timer_list
    timer_del_locked(timer_list, ts)
    if timer_mod_ns_locked(timer_list, ts, expire_time):
        timerlist_notify(timer_list)  # timerlist_rearm


timer_mod = timer_mod_ns


def timerlist_notify(timer_list: QEMUTimerList) -> None:
    timer_list.notify_cb(timer_list.clock_type)


def timerlist_deadline_ns(timer_list: QEMUTimerList) -> int:
    """ns until the first timer expires: 0 if it already has, -1 if none is active."""
    active = timer_list.active_timers
    if not active:
        return -1
    delta = active[0].expire_time - qemu_clock_get_ns(timer_list.clock_type)
    return delta if delta > 0 else 0


def qemu_soonest_timeout(timeout1: int, timeout2: int) -> int:
    """The sooner of two timeouts, -1 (none) being the latest of all, as an unsigned cast
    makes it in QEMU."""
    return timeout1 if (timeout1 & 0xFFFFFFFFFFFFFFFF) < (timeout2 & 0xFFFFFFFFFFFFFFFF) \
        else timeout2


def timerlistgroup_deadline_ns(tlg: QEMUTimerListGroup) -> int:
    deadline = -1
    for tl in tlg.tl:
        deadline = qemu_soonest_timeout(deadline, timerlist_deadline_ns(tl))
    return deadline


def timerlist_run_timers(timer_list: QEMUTimerList) -> bool:
    """Run every timer that has expired, each taken off the list before its callback (which
    may re-arm it); True if any ran."""
    active = timer_list.active_timers
    if not active:
        return False
    progress = False
    current_time = qemu_clock_get_ns(timer_list.clock_type)
    while active and active[0].expire_time <= current_time:
        ts = active.pop(0)
        ts.expire_time = -1
        ts.cb(ts.opaque)
        progress = True
    return progress


def qemu_clock_run_all_timers(tlg: QEMUTimerListGroup) -> bool:
    progress = False
    for tl in tlg.tl:
        progress |= timerlist_run_timers(tl)
    return progress


# -- qemu_poll_ns: ppoll(2) with a nanosecond timeout -------------------------------------------


class GPollFD(ctypes.Structure):
    """struct pollfd (GPollFD has the same layout on Linux)."""

    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_ppoll = _libc.ppoll
_ppoll.argtypes = [ctypes.POINTER(GPollFD), ctypes.c_ulong, ctypes.POINTER(_Timespec),
                   ctypes.c_void_p]
_ppoll.restype = ctypes.c_int


def qemu_poll_ns(fds: ctypes.Array[GPollFD], nfds: int, timeout: int) -> int:
    """Wait for ``fds`` for at most ``timeout`` ns (-1: no limit). ctypes drops the GIL for
    the call, as QEMU drops the BQL around it. Returns ppoll's result (-1 on EINTR too)."""
    if timeout < 0:
        ret = _ppoll(fds, nfds, None, None)
    else:
        ts = _Timespec(min(timeout // 1_000_000_000, INT32_MAX), timeout % 1_000_000_000)
        ret = _ppoll(fds, nfds, ts, None)
    if ret < 0 and ctypes.get_errno() not in (errno.EINTR, errno.EAGAIN):
        raise OSError(ctypes.get_errno(), "ppoll")
    return ret
