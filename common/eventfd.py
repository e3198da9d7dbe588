"""Stands for a real eventfd(2) (include/qemu/event_notifier.h's EventNotifier over one fd),
where the other end is a vhost-user backend that needs one.

Inside the replica an eventfd is a named semaphore (common/notifier.py). A vhost-user peer
gets kick and call as real eventfds over SCM_RIGHTS, so for vhost-user QEMU makes real
eventfds and names each one to KVM as ``eventfd:<pid>:<fd>``; ``open_notifier`` is the one
place that turns such a name back into an fd of the KVM process's own, with
pidfd_open + pidfd_getfd, as a KVM_IOEVENTFD or KVM_IRQFD naming an fd would in Linux.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select

from common.notifier import EventNotifier, PollBridge

EVENTFD_PREFIX = "eventfd:"
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438

_libc = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pid: int, targetfd: int) -> int:
    """A duplicate, in this process, of process ``pid``'s fd ``targetfd`` (close-on-exec)."""
    pidfd = _libc.syscall(SYS_pidfd_open, pid, 0)
    if pidfd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_open({pid}): {os.strerror(err)}")
    try:
        fd = _libc.syscall(SYS_pidfd_getfd, pidfd, targetfd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {targetfd}): {os.strerror(err)}")
        return fd
    finally:
        os.close(pidfd)


class EventfdNotifier:
    """An EventNotifier over a real eventfd: same interface as common.notifier's, plus
    ``fileno`` (the fd a vhost-user message carries, or a poll() waits on)."""

    __slots__ = ("fd", "name")

    def __init__(self, fd: int | None = None, initval: int = 0) -> None:
        self.fd = os.eventfd(initval, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if fd is None else fd
        self.name = f"{EVENTFD_PREFIX}{os.getpid()}:{self.fd}"

    @classmethod
    def from_name(cls, name: str) -> EventfdNotifier:
        """The eventfd another process named ``eventfd:<pid>:<fd>``, duplicated here."""
        try:
            pid, targetfd = (int(x) for x in name[len(EVENTFD_PREFIX):].split(":"))
        except ValueError:
            raise OSError(errno.EINVAL, f"{name}: not an eventfd name") from None
        fd = pidfd_getfd(pid, targetfd)
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            kind = ""
        if kind != "anon_inode:[eventfd]":  # eventfd_ctx_fdget: -EINVAL for any other file
            os.close(fd)
            raise OSError(errno.EINVAL, f"{name}: not an eventfd")
        return cls(fd)

    def fileno(self) -> int:
        return self.fd

    def set(self) -> None:
        """event_notifier_set: add 1 to the counter."""
        os.eventfd_write(self.fd, 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the counter is non-zero, then read (and so clear) it."""
        ms = -1 if timeout is None else int(timeout * 1000)
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        if not p.poll(ms):
            return False
        return self.test_and_clear()

    def test_and_clear(self) -> bool:
        try:
            return os.eventfd_read(self.fd) > 0
        except BlockingIOError:
            return False

    @property
    def pending(self) -> int:
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return 1 if p.poll(0) else 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class EventfdBridge:
    """PollBridge's interface for a notifier that is already an fd: no waiter thread."""

    def __init__(self, notifier: EventfdNotifier) -> None:
        self.notifier = notifier

    def fileno(self) -> int:
        return self.notifier.fd

    def set(self) -> None:
        self.notifier.set()

    def test_and_clear(self) -> int:
        try:
            return os.eventfd_read(self.notifier.fd)
        except BlockingIOError:
            return 0

    def stop(self) -> None:
        self.notifier.close()


def is_eventfd_name(name: str) -> bool:
    return name.startswith(EVENTFD_PREFIX)


def open_notifier(name: str) -> EventNotifier | EventfdNotifier:
    """The notifier a KVM_IOEVENTFD / KVM_IRQFD names: a real eventfd taken from the process
    that made it, or the replica's named semaphore."""
    if is_eventfd_name(name):
        return EventfdNotifier.from_name(name)
    return EventNotifier(name)


def poll_bridge(notifier: EventNotifier | EventfdNotifier) -> PollBridge | EventfdBridge:
    """The notifier made pollable by QEMU's main loop."""
    if isinstance(notifier, EventfdNotifier):
        return EventfdBridge(notifier)
    return PollBridge(notifier)
