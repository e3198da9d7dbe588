"""Stands for util/main-loop.c (with util/iohandler.c): the I/O thread's loop.

``main_loop_wait`` lets the MAIN_LOOP_POLL_FILL notifiers add their fds (slirp's sockets and
its timeout), bounds the wait by the main loop's timers in ns, and calls
``os_host_main_loop_wait``: the glib sources prepare (the main AioContext, "aio-context",
then the fd handlers' context, "io-handler"), the BQL is dropped for ``qemu_poll_ns``, and
the sources that are ready dispatch in that order (each its bottom halves, then its fd
handlers). Then slirp's MAIN_LOOP_POLL_OK notifier and the expired timers run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from common.trace import trace_event, traced
from qemuproc.aio import (
    AioContext,
    AioHandler,
    IOHandler,
    aio_ctx_check,
    aio_ctx_prepare,
    aio_dispatch,
    aio_set_fd_handler,
    iohandler_get_aio_context,
    qemu_bh_new,
    qemu_bh_schedule,
    qemu_get_aio_context,
)
from qemuproc.qemu_timer import (
    QEMU_CLOCK_VIRTUAL,
    SCALE_MS,
    GPollFD,
    QEMUTimer,
    init_clocks,
    qemu_clock_run_all_timers,
    qemu_poll_ns,
    qemu_soonest_timeout,
    timer_new_ns,
    timerlistgroup_deadline_ns,
)

trace_main_loop_wait = trace_event("main_loop_wait")


def notify_event_cb(opaque: Any) -> None:
    """No need to do anything: this bh only kicks the loop out of its wait."""


class MainLoop:
    """The iothread: its glib sources (two AioContexts), timers, and the Big QEMU Lock."""

    def __init__(self) -> None:
        self.ctx = qemu_get_aio_context()
        self.iohandler_ctx = iohandler_get_aio_context()
        self.gsources: tuple[AioContext, ...] = (self.ctx, self.iohandler_ctx)
        self.bql = threading.RLock()
        self.main_loop_tlg = init_clocks(self.qemu_timer_notify_cb)
        self.qemu_notify_bh = qemu_bh_new(notify_event_cb, None, "notify_event_cb")
        self.pollfds_fill: list[Callable[[list[tuple[int, int]], int], int]] = []
        self.pollfds_poll: list[Callable[[dict[int, int]], None]] = []
        self.iterations = 0
        self.quit = False
        self.on_iteration: Callable[[], None] | None = None
        self._gpollfds_key: list[tuple[int, int]] = []
        self._gpollfds: Any = (GPollFD * 0)()
        self._prepared_ready: list[AioContext] = []

    # -- fd handlers, notification, timers ------------------------------------------------------

    def qemu_set_fd_handler(self, fd: int, fd_read: IOHandler | None,
                            fd_write: IOHandler | None, opaque: Any, name: str = "") -> None:
        """Install, replace, or (both callbacks None) remove the handler of ``fd``."""
        aio_set_fd_handler(self.iohandler_ctx, fd, fd_read, fd_write, opaque, name)

    @property
    def io_handlers(self) -> list[AioHandler]:
        return self.iohandler_ctx.aio_handlers

    def qemu_notify_event(self) -> None:
        """Wake the loop (from any thread): schedule the do-nothing notify bh."""
        qemu_bh_schedule(self.qemu_notify_bh)

    def qemu_timer_notify_cb(self, type_: int) -> None:
        self.qemu_notify_event()

    def timer_new(self, cb: Callable[[Any], None], opaque: Any, name: str) -> QEMUTimer:
        """timer_new_ns(QEMU_CLOCK_VIRTUAL, ...): a timer on the main loop's list."""
        return timer_new_ns(self.main_loop_tlg, QEMU_CLOCK_VIRTUAL, cb, opaque, name)

    # -- the loop -----------------------------------------------------------------------------

    def glib_pollfds_fill(self, fds: list[tuple[int, int]], cur_timeout: int) -> int:
        """g_main_context_prepare + query: each source adds its fds; a source whose prepare
        found work makes the timeout 0 (and glib will skip its check)."""
        timeout = -1
        ready = self._prepared_ready
        ready.clear()
        for ctx in self.gsources:
            t = aio_ctx_prepare(ctx, fds)
            if t == 0:
                ready.append(ctx)
            if t >= 0 and (timeout < 0 or t < timeout):
                timeout = t
        timeout_ns = -1 if timeout < 0 else timeout * SCALE_MS
        return qemu_soonest_timeout(timeout_ns, cur_timeout)

    def glib_pollfds_poll(self, ready: dict[int, int]) -> None:
        """g_main_context_check + dispatch, in the sources' attach order."""
        pending = [ctx for ctx in self.gsources
                   if ctx in self._prepared_ready or aio_ctx_check(ctx, ready)]
        for ctx in pending:
            aio_dispatch(ctx, ready)

    def gpollfds(self, fds: list[tuple[int, int]]) -> Any:
        """The pollfd array for ``fds``, rebuilt only when the set changes."""
        if fds != self._gpollfds_key:
            self._gpollfds_key = fds
            self._gpollfds = (GPollFD * len(fds))(*fds)
        return self._gpollfds

    def os_host_main_loop_wait(self, fds: list[tuple[int, int]], timeout: int) -> dict[int, int]:
        timeout = self.glib_pollfds_fill(fds, timeout)
        pfds = self.gpollfds(fds)
        self.bql.release()
        try:
            ret = qemu_poll_ns(pfds, len(fds), timeout)
        finally:
            self.bql.acquire()
        ready = {p.fd: p.revents for p in pfds if p.revents} if ret > 0 else {}
        self.glib_pollfds_poll(ready)
        return ready

    @traced
    def main_loop_wait(self, nonblocking: bool = False) -> None:
        self.iterations += 1
        if trace_main_loop_wait.on:
            trace_main_loop_wait(iteration=self.iterations)
        fds: list[tuple[int, int]] = []
        timeout = 0 if nonblocking else -1  # mlpoll.timeout in ms; -1: UINT32_MAX, none
        for fill in self.pollfds_fill:  # MAIN_LOOP_POLL_FILL: slirp_pollfds_fill
            timeout = fill(fds, timeout)
        timeout_ns = -1 if timeout < 0 else timeout * SCALE_MS
        timeout_ns = qemu_soonest_timeout(timeout_ns,
                                          timerlistgroup_deadline_ns(self.main_loop_tlg))
        ready = self.os_host_main_loop_wait(fds, timeout_ns)
        for poll in self.pollfds_poll:  # MAIN_LOOP_POLL_OK: slirp_pollfds_poll
            poll(ready)
        qemu_clock_run_all_timers(self.main_loop_tlg)

    def run(self) -> None:
        with self.bql:
            while not self.quit:
                self.main_loop_wait()
                if self.on_iteration is not None:
                    self.on_iteration()
