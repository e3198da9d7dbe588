"""Stands for an eventfd (include/qemu/event_notifier.h, virt/kvm/eventfd.c's file side).

An ``EventNotifier`` is a POSIX named semaphore: ``set`` is the eventfd write, ``wait`` the
blocking read, ``test_and_clear`` the non-blocking read that resets the counter. ioeventfds
(KVM -> QEMU) and irqfds (QEMU -> KVM) are made of these.

A semaphore cannot be polled, so ``PollBridge`` carries one into a poll() loop: a waiter
thread blocks on the semaphore and writes a real eventfd that the loop polls.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import posix_ipc

from common import channel
from common.threads import set_thread_name

WAITER_TICK_S = 0.25


class EventNotifier:
    __slots__ = ("name", "sem", "set", "_acquire")

    def __init__(self, name: str, create: bool = False) -> None:
        flags = posix_ipc.O_CREX if create else 0
        self.sem = posix_ipc.Semaphore(name, flags, mode=0o600, initial_value=0)
        self.name = name
        self.set = self.sem.release  # event_notifier_set
        self._acquire = self.sem.acquire

    def wait(self, timeout: float | None = None) -> bool:
        try:
            self._acquire(timeout)
        except posix_ipc.BusyError:
            return False
        except posix_ipc.SignalError:  # EINTR: as in Channel.recv_raw
            channel.on_interrupt()
            return self.wait(timeout)
        return True

    def test_and_clear(self) -> bool:
        """event_notifier_test_and_clear: consume every pending signal; True if there was one."""
        got = False
        while self.sem.value > 0:
            try:
                self._acquire(0)
            except posix_ipc.BusyError:
                break
            got = True
        return got

    @property
    def pending(self) -> int:
        return self.sem.value

    def close(self) -> None:
        try:
            self.sem.close()
        except posix_ipc.Error:
            pass

    @staticmethod
    def unlink(name: str) -> None:
        try:
            posix_ipc.unlink_semaphore(name)
        except posix_ipc.ExistentialError:
            pass


class PollBridge:
    """A semaphore made pollable: a waiter thread turns each signal into an eventfd write.

    ``stop`` wakes the waiter with a signal of its own: the one signal the waiter takes
    after being stopped stays unforwarded and the one ``stop`` posted stays in the
    semaphore, so the count still holds every signal not passed on, for a bridge made later
    on the same semaphore. The waiter ends at once, and a device reset, which stops every
    bridge, takes microseconds rather than a waiter's tick per queue.
    """

    def __init__(self, notifier: EventNotifier, on_signal: Callable[[], None] | None = None):
        self.notifier = notifier
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop = False
        self._on_signal = on_signal
        self._thread = threading.Thread(target=self._run, name=f"bridge:{notifier.name}",
                                        daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self.efd

    def _run(self) -> None:
        set_thread_name("notifier-bridge")
        wait = self.notifier.wait
        efd = self.efd
        on_signal = self._on_signal
        while True:
            if not wait(WAITER_TICK_S):
                if self._stop:  # another waiter took stop's signal: nothing to account for
                    return
                continue
            if self._stop:
                return
            if on_signal is not None:
                on_signal()
            os.eventfd_write(efd, 1)

    def set(self) -> None:
        self.notifier.set()

    def test_and_clear(self) -> int:
        """The eventfd read: how many signals it held (0: none), and now none."""
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def stop(self) -> None:
        self._stop = True
        self.notifier.set()
        self._thread.join(1.0)
        os.close(self.efd)
        self.notifier.close()
