"""QEMU 7.2's main loop pieces in the QEMU process's own modules: util/async.c's bottom halves
(only scheduled ones on ``bh_list``, a ``BHListSlice`` per ``aio_bh_poll``, BH_* flags),
``aio_notify``'s ``notify_me``, util/qemu-timer.c's timer lists, and ``main_loop_wait``
waiting until the nearest timer in nanoseconds (no timing is asserted: the timeout handed to
``qemu_poll_ns`` is)."""

from __future__ import annotations

import os
import select
from typing import Any

import pytest

import qemuproc.main_loop as main_loop_mod
from qemuproc.aio import (
    BH_DELETED,
    BH_PENDING,
    BH_SCHEDULED,
    AioContext,
    aio_bh_new,
    aio_bh_poll,
    aio_compute_timeout,
    aio_ctx_check,
    aio_ctx_prepare,
    aio_notify,
    qemu_bh_cancel,
    qemu_bh_delete,
    qemu_bh_schedule,
)
from qemuproc.main_loop import MainLoop
from qemuproc.qemu_timer import (
    QEMU_CLOCK_VIRTUAL,
    qemu_clock_get_ns,
    qemu_soonest_timeout,
    timer_del,
    timer_mod,
    timer_pending,
    timerlistgroup_deadline_ns,
)


def readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


@pytest.fixture
def ctx() -> Any:
    c = AioContext("test")
    yield c
    os.close(c.notifier)


@pytest.mark.timeout(10)
def test_only_scheduled_bottom_halves_are_on_the_list(ctx: AioContext) -> None:
    ran: list[str] = []
    a = aio_bh_new(ctx, ran.append, "a")
    b = aio_bh_new(ctx, ran.append, "b")
    assert ctx.bh_list == []  # a new bh is on no list
    qemu_bh_schedule(a)
    qemu_bh_schedule(a)  # already pending: not enqueued twice
    qemu_bh_schedule(b)
    assert ctx.bh_list.count(a) == 1 and b in ctx.bh_list
    assert a.flags == BH_PENDING | BH_SCHEDULED
    assert aio_compute_timeout(ctx) == 0
    assert aio_bh_poll(ctx) == 1
    assert sorted(ran) == ["a", "b"] and a.flags == 0 and ctx.bh_list == []
    assert not ctx.bh_slice_list and aio_compute_timeout(ctx) == -1
    assert aio_bh_poll(ctx) == 0 and len(ran) == 2


@pytest.mark.timeout(10)
def test_a_bh_scheduled_while_polling_runs_in_the_next_poll(ctx: AioContext) -> None:
    ran: list[int] = []

    def again(n: int) -> None:
        ran.append(n)
        if n < 3:
            qemu_bh_schedule(bh)
            bh.opaque = n + 1

    bh = aio_bh_new(ctx, again, 1)
    qemu_bh_schedule(bh)
    aio_bh_poll(ctx)
    assert ran == [1] and ctx.bh_list == [bh]  # on the fresh list, not the slice being run
    aio_bh_poll(ctx)
    aio_bh_poll(ctx)
    assert ran == [1, 2, 3] and ctx.bh_list == []


@pytest.mark.timeout(10)
def test_cancelled_and_deleted_bottom_halves_do_not_run(ctx: AioContext) -> None:
    ran: list[str] = []
    a = aio_bh_new(ctx, ran.append, "a")
    d = aio_bh_new(ctx, ran.append, "d")
    qemu_bh_schedule(a)
    qemu_bh_cancel(a)
    assert a in ctx.bh_list and aio_compute_timeout(ctx) == -1  # listed, not scheduled
    qemu_bh_schedule(d)
    qemu_bh_delete(d)
    assert d.flags & BH_DELETED
    aio_bh_poll(ctx)
    assert ran == [] and ctx.bh_list == []


@pytest.mark.timeout(10)
def test_aio_notify_writes_the_notifier_only_while_the_loop_waits(ctx: AioContext) -> None:
    aio_notify(ctx)
    assert ctx.notified and not readable(ctx.notifier) and ctx.notifier_sets == 0
    fds: list[tuple[int, int]] = []
    assert aio_ctx_prepare(ctx, fds) == -1  # nothing to do: wait without a limit
    assert (ctx.notifier, select.POLLIN) in fds and ctx.notify_me
    bh = aio_bh_new(ctx, lambda _: None, None)
    qemu_bh_schedule(bh)  # from "another thread" while the loop is about to poll
    assert readable(ctx.notifier) and ctx.notifier_sets == 1
    assert aio_ctx_check(ctx, {ctx.notifier: select.POLLIN})
    assert not ctx.notify_me and not ctx.notified
    aio_bh_poll(ctx)
    qemu_bh_schedule(bh)  # while dispatching: the next prepare sees it, no write
    assert ctx.notifier_sets == 1
    assert aio_ctx_prepare(ctx, []) == 0


@pytest.mark.timeout(10)
def test_timers_keep_expiry_order_and_fire_once() -> None:
    ml = MainLoop()
    fired: list[str] = []
    now = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)
    late = ml.timer_new(fired.append, "late", "late")
    soon = ml.timer_new(fired.append, "soon", "soon")
    past = ml.timer_new(fired.append, "past", "past")
    timer_mod(late, now + 10**12)
    timer_mod(soon, now + 10**11)
    tl = late.timer_list
    assert tl.active_timers == [soon, late]
    assert 0 < timerlistgroup_deadline_ns(ml.main_loop_tlg) <= 10**11
    timer_mod(soon, now + 2 * 10**12)  # re-armed: moves behind late
    assert tl.active_timers == [late, soon]
    timer_mod(past, now - 1)
    assert timerlistgroup_deadline_ns(ml.main_loop_tlg) == 0
    main_loop_mod.qemu_clock_run_all_timers(ml.main_loop_tlg)
    assert fired == ["past"] and not timer_pending(past)
    timer_del(late)
    timer_del(soon)
    assert not tl.active_timers and timerlistgroup_deadline_ns(ml.main_loop_tlg) == -1
    assert qemu_soonest_timeout(-1, 5) == 5 and qemu_soonest_timeout(7, -1) == 7
    assert qemu_soonest_timeout(-1, -1) == -1 and qemu_soonest_timeout(3, 9) == 3


@pytest.mark.timeout(10)
def test_main_loop_waits_until_the_timer_in_nanoseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait handed to ppoll is what is left until the timer, in ns, not whole ms."""
    ml = MainLoop()
    waits: list[int] = []
    real = main_loop_mod.qemu_poll_ns

    def recording(fds: Any, nfds: int, timeout: int) -> int:
        waits.append(timeout)
        return real(fds, nfds, timeout)

    monkeypatch.setattr(main_loop_mod, "qemu_poll_ns", recording)
    fired: list[int] = []
    t = ml.timer_new(fired.append, 1, "x-txtimer")
    with ml.bql:
        aio_bh_poll(ml.ctx)  # whatever earlier tests left scheduled
        timer_mod(t, qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + 20_000_000)
        for _ in range(100):
            ml.main_loop_wait()
            if fired:
                break
    assert fired == [1]
    # timer_mod woke the loop (qemu_notify_event's bh: a wait of 0), then it slept for the
    # rest of the 20 ms, to the nanosecond
    assert waits[0] == 0
    slept = [w for w in waits if w > 0]
    assert slept and all(w < 20_000_000 for w in slept), waits
    assert any(w % 1_000_000 for w in slept), waits
