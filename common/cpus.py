"""Stands for softmmu/cpus.c's pause machinery (pause_all_vcpus, qemu_wait_io_event,
qemu_cpu_kick): a safe point in a thread's loop where the monitor can hold it.

A ``Gate`` is that safe point. The thread runs ``if gate.armed: gate.wait()`` there, a single
attribute test while no one asked for anything, so the hot paths (a vCPU's run loop, QEMU's
main loop) pay nothing for it. Each process puts its gates beside its vCPU code
(qemuproc/kvm_all.py, kvmproc/vcpu.py, guestproc/cpu.py) and its main loop; the monitor
(common/monitor/) arms them for ``stop``, ``step`` and a pdb session.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

SIG_IPI = "SIG_IPI"
"""The VM-channel record that stands for QEMU's SIG_IPI to its vCPU thread in KVM_RUN
(pause_all_vcpus): KVM makes the guest exit and KVM_RUN return KVM_EXIT_INTR."""
PARK_TICK_S = 0.25

WRAPPER_FILES = frozenset([threading.__file__, __file__] + [
    str(Path(__file__).with_name(name)) for name in ("channel.py", "notifier.py")])
"""Files whose frames are waiting machinery, skipped when showing where a thread is."""


def thread_frame(ident: int | None) -> FrameType | None:
    """A thread's innermost frame outside the waiting wrappers (locks, channels, gates)."""
    frame = sys._current_frames().get(ident or -1)
    innermost = frame
    while frame is not None and frame.f_code.co_filename in WRAPPER_FILES:
        frame = frame.f_back
    return frame or innermost


def thread_where(ident: int | None) -> str:
    """Where a thread is now, as ``function (file:line)``."""
    frame = thread_frame(ident)
    if frame is None:
        return "not running"
    return f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"



class Gate:
    """A safe point in one thread's loop where the monitor can hold that thread (stop), let
    it through once (step), or hand it work to do there (a pdb session).

    ``on_park`` / ``on_unpark`` run in the thread around a hold (e.g. drop and retake the Big
    QEMU Lock); ``on_arm`` hears when ``armed`` changes; ``nudge`` makes a thread that is
    blocked in its loop come round; ``idle_check`` runs every tick while parked and may raise
    to end the hold (e.g. the VM was destroyed).
    """

    def __init__(self, name: str, thread_name: str = "MainThread") -> None:
        self.name = name
        self.thread_name = thread_name
        self.armed = False
        self.parked = False
        self.parks = 0
        self.passes = 0
        self.ident: int | None = None
        self.on_park: Callable[[], None] | None = None
        self.on_unpark: Callable[[], None] | None = None
        self.on_arm: Callable[[bool], None] | None = None
        self.nudge: Callable[[], None] | None = None
        self.idle_check: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._budget = 0
        self._work: list[Callable[[FrameType], bool]] = []

    def _update(self) -> None:
        armed = self._stop or bool(self._work)
        if armed != self.armed:
            self.armed = armed
            if self.on_arm is not None:
                self.on_arm(armed)

    @property
    def stopped(self) -> bool:
        return self._stop

    def thread_ident(self) -> int | None:
        if self.ident is not None:
            return self.ident
        for t in threading.enumerate():
            if t.name == self.thread_name:
                return t.ident
        return None

    def where(self) -> str:
        return "parked" if self.parked else thread_where(self.thread_ident())

    # -- the thread's side ----------------------------------------------------------------------

    def wait(self) -> None:
        """Called by the gate's thread when ``armed``: hold, step, or run work."""
        caller = sys._getframe(1)
        released = False
        try:
            with self._cond:
                self.ident = threading.get_ident()
                while True:
                    if self._work:
                        fn = self._work.pop(0)
                        self._update()
                        self._cond.release()
                        try:
                            through = fn(caller)
                        finally:
                            self._cond.acquire()
                        if through:
                            break
                        continue
                    if not self._stop:
                        break
                    if self._budget:
                        self._budget -= 1
                        break
                    if not self.parked:
                        self.parked = True
                        self.parks += 1
                        self._cond.notify_all()
                        if self.on_park is not None and not released:
                            self.on_park()
                            released = True
                    self._cond.wait(PARK_TICK_S)
                    if self.idle_check is not None and self.parked and not self._work:
                        self.idle_check()
        finally:
            with self._cond:
                self.parked = False
                self.passes += 1
                self._cond.notify_all()
            if released and self.on_unpark is not None:
                self.on_unpark()

    # -- the monitor's side ---------------------------------------------------------------------

    def request_stop(self, nudge: bool = True) -> None:
        with self._cond:
            self._stop = True
            self._budget = 0
            self._update()
        if nudge and self.nudge is not None:
            self.nudge()

    def release(self) -> None:
        with self._cond:
            self._stop = False
            self._budget = 0
            self._update()
            self._cond.notify_all()

    def wait_parked(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.parked:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def step(self, timeout: float) -> bool:
        """Let the parked thread run one iteration; True once it is parked again. An
        iteration still waiting halfway through ``timeout`` is nudged to finish."""
        with self._cond:
            if not self.parked:
                raise RuntimeError(f"{self.name} is not at its stop point")
            parks = self.parks
            self._budget = 1
            self._cond.notify_all()
            start = time.monotonic()
            nudged = self.nudge is None
            while self.parks == parks:
                waited = time.monotonic() - start
                if waited >= timeout:
                    return False
                if not nudged and waited >= timeout / 2:
                    nudged = True
                    self._cond.release()
                    try:
                        self.nudge()  # type: ignore[misc]
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait(timeout / 2 - waited if not nudged else timeout - waited)
            return True

    def post(self, fn: Callable[[FrameType], bool]) -> None:
        """Have the thread run ``fn(frame of its loop)`` at the gate; True lets it through."""
        with self._cond:
            self._work.append(fn)
            self._update()
            self._cond.notify_all()
        if self.nudge is not None:
            self.nudge()

    def withdraw(self, fn: Callable[[FrameType], bool]) -> bool:
        """Take back work the thread has not started; False if it already has."""
        with self._cond:
            if fn in self._work:
                self._work.remove(fn)
                self._update()
                return True
            return False

    def describe(self) -> dict[str, Any]:
        return {"state": "parked" if self.parked else ("stopping" if self._stop else "running"),
                "where": self.where(), "passes": self.passes}
