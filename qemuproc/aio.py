"""Stands for util/async.c (with the fd-handler half of util/aio-posix.c): an AioContext, its
bottom halves, its fd handlers and its event notifier, as QEMU 7.2 has them.

Only scheduled bottom halves are on ``ctx.bh_list``: ``qemu_bh_schedule`` sets BH_PENDING |
BH_SCHEDULED and pushes the bh on the list's head unless it was already pending, then calls
``aio_notify``. ``aio_bh_poll`` moves the whole list into a ``BHListSlice`` and pops bhs off it,
clearing their flags as it goes and running those still scheduled and not deleted; a bh
scheduled meanwhile goes on the fresh ``bh_list`` and runs in the next poll. ``aio_notify``
writes the event notifier only while the loop is about to sleep or sleeping (``notify_me``,
set by ``aio_ctx_prepare`` and cleared by ``aio_ctx_check``); otherwise the loop sees the
scheduled bh when it computes its timeout.

The atomics of the real code (``qatomic_fetch_or`` on ``bh->flags``, the atomic list insert
and move) are one short lock here, since the vCPU thread schedules bhs too.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from common.trace import trace_event, traced

BH_PENDING = 1 << 0
"""Already enqueued and waiting for aio_bh_poll()."""
BH_SCHEDULED = 1 << 1
"""Invoke the callback."""
BH_DELETED = 1 << 2
"""Delete without invoking the callback."""
BH_ONESHOT = 1 << 3
"""Delete after invoking the callback."""
BH_IDLE = 1 << 4
"""Schedule periodically when the event loop is idle."""

IDLE_BH_TIMEOUT_NS = 10_000_000
"""aio_compute_bh_timeout: idle bottom halves are polled at least every 10 ms."""

trace_aio_bh_schedule = trace_event("qemu_bh_schedule")
trace_aio_notify = trace_event("aio_notify")

IOHandler = Callable[[Any], None]


class QEMUBH:
    __slots__ = ("ctx", "name", "cb", "opaque", "flags", "runs")

    def __init__(self, ctx: AioContext, cb: Callable[[Any], None], opaque: Any,
                 name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.cb = cb
        self.opaque = opaque
        self.flags = 0
        self.runs = 0


class BHListSlice:
    """The bhs one aio_bh_poll took off ``ctx.bh_list``; the list's head is its end."""

    __slots__ = ("bh_list",)

    def __init__(self, bh_list: list[QEMUBH]) -> None:
        self.bh_list = bh_list


class AioHandler:
    """One fd the context polls and the callbacks for it (util/aio-posix.c)."""

    __slots__ = ("fd", "io_read", "io_write", "opaque", "name", "deleted")

    def __init__(self, fd: int, io_read: IOHandler | None, io_write: IOHandler | None,
                 opaque: Any, name: str) -> None:
        self.fd = fd
        self.io_read = io_read
        self.io_write = io_write
        self.opaque = opaque
        self.name = name
        self.deleted = False


class AioContext:
    def __init__(self, name: str) -> None:
        self.name = name
        self.bh_list: list[QEMUBH] = []  # QSLIST: head at the end
        self.bh_slice_list: deque[BHListSlice] = deque()
        self.bh_lock = threading.Lock()  # the atomics on bh_list and bh->flags
        self.notify_me = 0
        self.notified = False
        self.notifier = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.aio_handlers: list[AioHandler] = []
        self.notifies = 0  # aio_notify calls
        self.notifier_sets = 0  # ... of which wrote the notifier (a poller waited)
        aio_set_event_notifier(self, self.notifier, aio_context_notifier_cb, "aio_notifier")

    def fileno(self) -> int:
        return self.notifier


# -- bottom halves ----------------------------------------------------------------------------


def aio_bh_enqueue(bh: QEMUBH, new_flags: int) -> None:
    """Called from any thread: flag the bh and, unless it is already pending, push it on the
    head of ``ctx.bh_list``; then wake the context's poller."""
    ctx = bh.ctx
    with ctx.bh_lock:
        old_flags = bh.flags  # qatomic_fetch_or
        bh.flags = old_flags | BH_PENDING | new_flags
        if not old_flags & BH_PENDING:
            ctx.bh_list.append(bh)  # QSLIST_INSERT_HEAD_ATOMIC
    aio_notify(ctx)


def aio_bh_dequeue(ctx: AioContext, head: list[QEMUBH]) -> tuple[QEMUBH | None, int]:
    """Take the slice's first bh and clear its PENDING, SCHEDULED and IDLE flags, returning
    the flags it had (only aio_bh_poll calls this)."""
    if not head:
        return None, 0
    bh = head.pop()  # QSLIST_REMOVE_HEAD
    with ctx.bh_lock:
        flags = bh.flags  # qatomic_fetch_and
        bh.flags = flags & ~(BH_PENDING | BH_SCHEDULED | BH_IDLE)
    return bh, flags


def aio_bh_new(ctx: AioContext, cb: Callable[[Any], None], opaque: Any,
               name: str = "") -> QEMUBH:
    """A new bh is on no list until it is scheduled."""
    return QEMUBH(ctx, cb, opaque, name or getattr(cb, "__name__", "bh"))


def aio_bh_schedule_oneshot(ctx: AioContext, cb: Callable[[Any], None], opaque: Any,
                            name: str = "") -> None:
    aio_bh_enqueue(aio_bh_new(ctx, cb, opaque, name), BH_SCHEDULED | BH_ONESHOT)


_main_ctx: AioContext | None = None
_iohandler_ctx: AioContext | None = None


def qemu_get_aio_context() -> AioContext:
    """The main loop's AioContext (created on first use, like qemu_init_main_loop)."""
    global _main_ctx
    if _main_ctx is None:
        _main_ctx = AioContext("aio-context")
    return _main_ctx


def iohandler_get_aio_context() -> AioContext:
    """The context of qemu_set_fd_handler's fds (util/main-loop.c's iohandler_ctx)."""
    global _iohandler_ctx
    if _iohandler_ctx is None:
        _iohandler_ctx = AioContext("io-handler")
    return _iohandler_ctx


def qemu_bh_new(cb: Callable[[Any], None], opaque: Any, name: str = "") -> QEMUBH:
    """A bottom half in the main loop's context."""
    return aio_bh_new(qemu_get_aio_context(), cb, opaque, name)


def qemu_bh_schedule(bh: QEMUBH) -> None:
    if trace_aio_bh_schedule.on:
        trace_aio_bh_schedule(bh=bh.name)
    aio_bh_enqueue(bh, BH_SCHEDULED)


def qemu_bh_schedule_idle(bh: QEMUBH) -> None:
    aio_bh_enqueue(bh, BH_SCHEDULED | BH_IDLE)


def qemu_bh_cancel(bh: QEMUBH) -> None:
    """Unschedule: the bh stays on the list (if it is there) until aio_bh_poll drops it."""
    with bh.ctx.bh_lock:
        bh.flags &= ~BH_SCHEDULED


def qemu_bh_delete(bh: QEMUBH) -> None:
    """Delete at the next aio_bh_poll, without running it."""
    aio_bh_enqueue(bh, BH_DELETED)


@traced
def aio_bh_poll(ctx: AioContext) -> int:
    """Run the bhs scheduled so far, each once; 1 if any that ran was not idle."""
    with ctx.bh_lock:  # QSLIST_MOVE_ATOMIC
        slice_ = BHListSlice(ctx.bh_list)
        ctx.bh_list = []
    ctx.bh_slice_list.append(slice_)
    ret = 0
    slices = ctx.bh_slice_list
    while slices:
        s = slices[0]
        bh, flags = aio_bh_dequeue(ctx, s.bh_list)
        if bh is None:
            slices.popleft()
            continue
        if flags & (BH_SCHEDULED | BH_DELETED) == BH_SCHEDULED:
            if not flags & BH_IDLE:  # idle bhs don't count as progress
                ret = 1
            bh.runs += 1
            bh.cb(bh.opaque)  # aio_bh_call
    return ret


def aio_compute_bh_timeout(head: list[QEMUBH], timeout: int) -> int:
    for bh in head:
        if bh.flags & (BH_SCHEDULED | BH_DELETED) == BH_SCHEDULED:
            if not bh.flags & BH_IDLE:
                return 0  # non-idle bhs run at once
            timeout = IDLE_BH_TIMEOUT_NS
    return timeout


def aio_compute_timeout(ctx: AioContext) -> int:
    """How long the context may sleep, in ns (-1: no limit); this replica's contexts carry
    no timers of their own, so only their bottom halves bound it."""
    timeout = aio_compute_bh_timeout(ctx.bh_list, -1)
    if timeout == 0:
        return 0
    for s in ctx.bh_slice_list:
        timeout = aio_compute_bh_timeout(s.bh_list, timeout)
        if timeout == 0:
            return 0
    return timeout


def aio_bh_scheduled(ctx: AioContext) -> bool:
    """The bh test of aio_ctx_check: is any bh scheduled and not deleted?"""
    for head in (ctx.bh_list, *(s.bh_list for s in ctx.bh_slice_list)):
        for bh in head:
            if bh.flags & (BH_SCHEDULED | BH_DELETED) == BH_SCHEDULED:
                return True
    return False


def bh_flag_names(flags: int) -> list[str]:
    return [name for bit, name in ((BH_PENDING, "BH_PENDING"), (BH_SCHEDULED, "BH_SCHEDULED"),
                                   (BH_DELETED, "BH_DELETED"), (BH_ONESHOT, "BH_ONESHOT"),
                                   (BH_IDLE, "BH_IDLE")) if flags & bit]


# -- notification -----------------------------------------------------------------------------


def aio_notify(ctx: AioContext) -> None:
    """Tell the context's poller there is work: the notifier is written only if the poller
    is in (or about to enter) its wait; else it will see the work before it sleeps."""
    if trace_aio_notify.on:
        trace_aio_notify()
    ctx.notifies += 1
    ctx.notified = True
    if ctx.notify_me:
        ctx.notifier_sets += 1
        os.eventfd_write(ctx.notifier, 1)  # event_notifier_set


def aio_notify_accept(ctx: AioContext) -> None:
    ctx.notified = False


def aio_context_notifier_cb(ctx: AioContext) -> None:
    """The notifier's read handler: event_notifier_test_and_clear."""
    try:
        os.eventfd_read(ctx.notifier)
    except BlockingIOError:
        pass


# -- fd handlers (util/aio-posix.c) -----------------------------------------------------------


def aio_set_fd_handler(ctx: AioContext, fd: int, io_read: IOHandler | None,
                       io_write: IOHandler | None, opaque: Any, name: str = "") -> None:
    """Install, replace, or (both callbacks None) remove the handler of ``fd``."""
    for h in ctx.aio_handlers:
        if h.fd == fd and not h.deleted:
            if io_read is None and io_write is None:
                h.deleted = True
            else:
                h.io_read, h.io_write, h.opaque = io_read, io_write, opaque
            break
    else:
        if io_read is not None or io_write is not None:
            ctx.aio_handlers.append(AioHandler(fd, io_read, io_write, opaque,
                                               name or getattr(io_read, "__name__", "")))
    aio_notify(ctx)


def aio_set_event_notifier(ctx: AioContext, fd: int, handler: IOHandler, name: str) -> None:
    ctx.aio_handlers.append(AioHandler(fd, handler, None, ctx, name))


def aio_dispatch_handlers(ctx: AioContext, ready: dict[int, int]) -> None:
    for h in list(ctx.aio_handlers):
        if h.deleted:
            continue
        ev = ready.get(h.fd, 0)
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and h.io_read:
            h.io_read(h.opaque)
        if ev & select.POLLOUT and h.io_write and not h.deleted:
            h.io_write(h.opaque)
    if any(h.deleted for h in ctx.aio_handlers):
        ctx.aio_handlers = [h for h in ctx.aio_handlers if not h.deleted]


# -- the context as a GSource of the glib main loop --------------------------------------------


def aio_ctx_prepare(ctx: AioContext, fds: list[tuple[int, int]]) -> int:
    """Announce the coming wait (notify_me), add the context's fds; returns the glib timeout
    in ms (0: ready now, so glib will not call check)."""
    ctx.notify_me |= 1
    for h in ctx.aio_handlers:
        if not h.deleted:
            fds.append((h.fd, (select.POLLIN if h.io_read else 0)
                        | (select.POLLOUT if h.io_write else 0)))
    return qemu_timeout_ns_to_ms(aio_compute_timeout(ctx))


def aio_ctx_check(ctx: AioContext, ready: dict[int, int]) -> bool:
    """After the wait: stop asking for notifier writes; is there anything to dispatch?"""
    ctx.notify_me &= ~1
    aio_notify_accept(ctx)
    return aio_bh_scheduled(ctx) or any(h.fd in ready for h in ctx.aio_handlers)


def aio_dispatch(ctx: AioContext, ready: dict[int, int]) -> None:
    """aio_ctx_dispatch: the bottom halves, then the ready fds' handlers."""
    aio_bh_poll(ctx)
    aio_dispatch_handlers(ctx, ready)


def qemu_timeout_ns_to_ms(ns: int) -> int:
    """Round a ns timeout up to whole ms, as glib's poll timeout must be (-1 stays -1)."""
    if ns < 0:
        return -1
    return (ns + 999_999) // 1_000_000
