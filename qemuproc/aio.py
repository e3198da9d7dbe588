"""Stands for util/async.c: bottom halves of the main AioContext, and its notifier.

``qemu_bh_schedule`` marks a bh and calls ``aio_notify``, which sets the context's event
notifier (an eventfd the main loop polls) so that a sleeping ``main_loop_wait`` wakes up.
``aio_bh_poll`` runs every scheduled bh once; bhs deleted meanwhile are freed after the walk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from common.trace import trace_event, traced

trace_aio_bh_schedule = trace_event("qemu_bh_schedule")
trace_aio_notify = trace_event("aio_notify")


class QEMUBH:
    __slots__ = ("ctx", "cb", "opaque", "name", "scheduled", "idle", "deleted", "runs")

    def __init__(self, ctx: AioContext, cb: Callable[[Any], None], opaque: Any,
                 name: str) -> None:
        self.ctx = ctx
        self.cb = cb
        self.opaque = opaque
        self.name = name
        self.scheduled = False
        self.idle = False
        self.deleted = False
        self.runs = 0


class AioContext:
    def __init__(self) -> None:
        self.first_bh: list[QEMUBH] = []
        self.walking_bh = 0
        self.notifier = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.notified = False
        self.notifies = 0

    def fileno(self) -> int:
        return self.notifier


def aio_bh_new(ctx: AioContext, cb: Callable[[Any], None], opaque: Any, name: str = "") -> QEMUBH:
    bh = QEMUBH(ctx, cb, opaque, name or getattr(cb, "__name__", "bh"))
    ctx.first_bh.insert(0, bh)  # pushed on the head of ctx->first_bh
    return bh


_main_ctx: AioContext | None = None


def qemu_get_aio_context() -> AioContext:
    """The main loop's AioContext (created on first use, like qemu_init_main_loop)."""
    global _main_ctx
    if _main_ctx is None:
        _main_ctx = AioContext()
    return _main_ctx


def qemu_bh_new(cb: Callable[[Any], None], opaque: Any, name: str = "") -> QEMUBH:
    """A bottom half in the main loop's context."""
    return aio_bh_new(qemu_get_aio_context(), cb, opaque, name)


def aio_notify(ctx: AioContext) -> None:
    """Wake the thread polling this context (event_notifier_set on ctx->notifier)."""
    if trace_aio_notify.on:
        trace_aio_notify()
    ctx.notifies += 1
    if not ctx.notified:
        ctx.notified = True
        os.eventfd_write(ctx.notifier, 1)  # event_notifier_set


def aio_notify_accept(ctx: AioContext) -> None:
    if ctx.notified:
        ctx.notified = False
        try:
            os.eventfd_read(ctx.notifier)
        except BlockingIOError:
            pass


def qemu_bh_schedule(bh: QEMUBH) -> None:
    if trace_aio_bh_schedule.on:
        trace_aio_bh_schedule(bh=bh.name)
    bh.idle = False
    if not bh.scheduled:
        bh.scheduled = True
        aio_notify(bh.ctx)


def qemu_bh_cancel(bh: QEMUBH) -> None:
    bh.scheduled = False


def qemu_bh_delete(bh: QEMUBH) -> None:
    bh.scheduled = False
    bh.deleted = True


@traced
def aio_bh_poll(ctx: AioContext) -> int:
    """Run each scheduled, live bh once; returns how many ran."""
    ret = 0
    ctx.walking_bh += 1
    for bh in list(ctx.first_bh):
        if bh.scheduled and not bh.deleted:
            bh.scheduled = False
            if not bh.idle:
                ret += 1
            bh.idle = False
            bh.runs += 1
            bh.cb(bh.opaque)
    ctx.walking_bh -= 1
    if not ctx.walking_bh:
        ctx.first_bh = [bh for bh in ctx.first_bh if not bh.deleted]
    return ret


def aio_bh_pending(ctx: AioContext) -> bool:
    return any(bh.scheduled and not bh.deleted for bh in ctx.first_bh)
