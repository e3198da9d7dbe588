"""Stands for util/main-loop.c and util/iohandler.c: the I/O thread's loop.

``main_loop_wait`` gathers the fds to watch (slirp's sockets, the fd handlers, the
AioContext notifier), sleeps in a real poll() with the Big QEMU Lock released, then
dispatches what is ready: fd handlers, bottom halves, slirp, timers.
"""

from __future__ import annotations

import heapq
import itertools
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from common.trace import trace_event, traced
from qemuproc.aio import (
    aio_bh_pending,
    aio_bh_poll,
    aio_notify,
    aio_notify_accept,
    qemu_get_aio_context,
)

IOHandler = Callable[[Any], None]
trace_main_loop_wait = trace_event("main_loop_wait")


class IOHandlerRecord:
    __slots__ = ("fd", "fd_read", "fd_write", "opaque", "deleted", "name")

    def __init__(self, fd: int, fd_read: IOHandler | None, fd_write: IOHandler | None,
                 opaque: Any, name: str) -> None:
        self.fd = fd
        self.fd_read = fd_read
        self.fd_write = fd_write
        self.opaque = opaque
        self.deleted = False
        self.name = name


class QEMUTimer:
    __slots__ = ("expire_ns", "cb", "opaque", "name", "armed")

    def __init__(self, cb: Callable[[Any], None], opaque: Any, name: str) -> None:
        self.cb = cb
        self.opaque = opaque
        self.name = name
        self.expire_ns = -1
        self.armed = False


class MainLoop:
    """The iothread: its AioContext, fd handlers, timers, and the Big QEMU Lock."""

    def __init__(self) -> None:
        self.ctx = qemu_get_aio_context()
        self.io_handlers: list[IOHandlerRecord] = []
        self.bql = threading.RLock()
        self.timers: list[tuple[int, int, QEMUTimer]] = []
        self._seq = itertools.count()
        self.pollfds_fill: list[Callable[[list[tuple[int, int]], int], int]] = []
        self.pollfds_poll: list[Callable[[dict[int, int]], None]] = []
        self.iterations = 0
        self.quit = False
        self.on_iteration: Callable[[], None] | None = None

    # -- fd handlers --------------------------------------------------------------------------

    def qemu_set_fd_handler(self, fd: int, fd_read: IOHandler | None,
                            fd_write: IOHandler | None, opaque: Any, name: str = "") -> None:
        """Install, replace, or (both callbacks None) remove the handler of ``fd``."""
        for rec in self.io_handlers:
            if rec.fd == fd and not rec.deleted:
                if fd_read is None and fd_write is None:
                    rec.deleted = True
                else:
                    rec.fd_read, rec.fd_write, rec.opaque = fd_read, fd_write, opaque
                break
        else:
            if fd_read is not None or fd_write is not None:
                self.io_handlers.append(IOHandlerRecord(fd, fd_read, fd_write, opaque,
                                                        name or getattr(fd_read, "__name__", "")))
        self.qemu_notify_event()

    def qemu_notify_event(self) -> None:
        aio_notify(self.ctx)

    def qemu_iohandler_fill(self, fds: list[tuple[int, int]]) -> None:
        for rec in self.io_handlers:
            if rec.deleted:
                continue
            events = (select.POLLIN if rec.fd_read else 0) | (select.POLLOUT if rec.fd_write
                                                               else 0)
            fds.append((rec.fd, events))

    def qemu_iohandler_poll(self, ready: dict[int, int]) -> None:
        for rec in list(self.io_handlers):
            if rec.deleted:
                continue
            ev = ready.get(rec.fd, 0)
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and rec.fd_read:
                rec.fd_read(rec.opaque)
            if ev & select.POLLOUT and rec.fd_write and not rec.deleted:
                rec.fd_write(rec.opaque)
        self.io_handlers = [r for r in self.io_handlers if not r.deleted]

    # -- timers (QEMU_CLOCK_REALTIME-like, on the monotonic clock) ----------------------------

    def timer_new(self, cb: Callable[[Any], None], opaque: Any, name: str) -> QEMUTimer:
        return QEMUTimer(cb, opaque, name)

    def timer_mod(self, t: QEMUTimer, expire_ns: int) -> None:
        t.expire_ns = expire_ns
        t.armed = True
        heapq.heappush(self.timers, (expire_ns, next(self._seq), t))
        self.qemu_notify_event()

    @staticmethod
    def timer_del(t: QEMUTimer) -> None:
        t.armed = False

    def timerlist_deadline_ns(self) -> int:
        while self.timers and (not self.timers[0][2].armed
                               or self.timers[0][2].expire_ns != self.timers[0][0]):
            heapq.heappop(self.timers)
        if not self.timers:
            return -1
        return max(0, self.timers[0][0] - time.monotonic_ns())

    def qemu_clock_run_all_timers(self) -> None:
        now = time.monotonic_ns()
        while self.timers and self.timers[0][0] <= now:
            expire, _, t = heapq.heappop(self.timers)
            if t.armed and t.expire_ns == expire:
                t.armed = False
                t.cb(t.opaque)

    # -- the loop -----------------------------------------------------------------------------

    def os_host_main_loop_wait(self, fds: list[tuple[int, int]], timeout_ms: int) -> dict[int, int]:
        """poll() with the BQL released, as QEMU's g_poll runs unlocked."""
        p = select.poll()
        for fd, ev in fds:
            p.register(fd, ev)
        self.bql.release()
        try:
            ready = p.poll(timeout_ms)
        finally:
            self.bql.acquire()
        return dict(ready)

    @traced
    def main_loop_wait(self, nonblocking: bool = False) -> None:
        self.iterations += 1
        if trace_main_loop_wait.on:
            trace_main_loop_wait(iteration=self.iterations)
        fds: list[tuple[int, int]] = [(self.ctx.notifier, select.POLLIN)]
        timeout = 0 if nonblocking else -1  # mlpoll.timeout; -1: UINT32_MAX, none
        for fill in self.pollfds_fill:  # MAIN_LOOP_POLL_FILL: slirp_pollfds_fill
            timeout = fill(fds, timeout)
        self.qemu_iohandler_fill(fds)
        if aio_bh_pending(self.ctx):
            timeout = 0
        else:
            deadline = self.timerlist_deadline_ns()
            if deadline >= 0:  # qemu_soonest_timeout
                timer_ms = (deadline + 999_999) // 1_000_000
                timeout = timer_ms if timeout < 0 else min(timeout, timer_ms)
        ready = self.os_host_main_loop_wait(fds, timeout)
        aio_notify_accept(self.ctx)
        # glib_pollfds_poll: the fd handlers (an ioeventfd's among them), then the
        # AioContext's bottom halves; slirp's MAIN_LOOP_POLL_OK notifier comes after both
        self.qemu_iohandler_poll(ready)
        aio_bh_poll(self.ctx)
        for poll in self.pollfds_poll:  # MAIN_LOOP_POLL_OK: slirp_pollfds_poll
            poll(ready)
        self.qemu_clock_run_all_timers()

    def run(self) -> None:
        with self.bql:
            while not self.quit:
                self.main_loop_wait()
                if self.on_iteration is not None:
                    self.on_iteration()
