"""A one-way channel: a POSIX message queue carrying msgpack records.

It plays the part of a file descriptor that an ioctl or a ``read()`` of ``kvm_run`` would use
in the real system. The queue descriptor can be polled, so a channel joins a poll() loop.
"""

from __future__ import annotations

import posix_ipc

from common.kvm_abi import packb, unpackb

MQ_MAX_MESSAGES = 8
MQ_MESSAGE_SIZE = 1024


class ChannelClosed(Exception):
    """The peer is gone or the run is over."""


def on_interrupt() -> None:
    """Called when a signal interrupts a wait (EINTR), before the wait is retried.

    posix_ipc runs the signal's Python handler itself and then raises SignalError in place
    of whatever the handler raised; a process that stops on a signal rebinds this name to
    a function that raises its stop exception again (common/process.py).
    """


class Channel:
    __slots__ = ("name", "mq", "_send", "_receive")

    def __init__(self, name: str, create: bool = False) -> None:
        flags = posix_ipc.O_CREX if create else 0
        self.mq = posix_ipc.MessageQueue(
            name, flags, mode=0o600, max_messages=MQ_MAX_MESSAGES, max_message_size=MQ_MESSAGE_SIZE
        )
        self.name = name
        self._send = self.mq.send
        self._receive = self.mq.receive

    def fileno(self) -> int:
        return self.mq.mqd

    def send(self, record: list) -> None:
        try:
            self._send(packb(record))
        except posix_ipc.SignalError:  # EINTR: see recv_raw
            on_interrupt()
            self.send(record)

    def send_raw(self, data: bytes, timeout: float | None = None) -> None:
        """Send a pre-encoded record (the hot paths pack their constant records once)."""
        try:
            self._send(data, timeout)
        except posix_ipc.SignalError:
            on_interrupt()
            self.send_raw(data, timeout)

    def recv(self, timeout: float | None = None) -> list | None:
        """The next record; None if ``timeout`` passes first."""
        try:
            data, _ = self._receive(timeout)
        except posix_ipc.BusyError:
            return None
        except posix_ipc.SignalError:
            on_interrupt()
            return self.recv(timeout)
        return unpackb(data)

    def recv_raw(self, timeout: float | None = None) -> bytes | None:
        """The next record, still encoded; None if ``timeout`` passes first.

        A wait interrupted by a signal (EINTR) calls ``on_interrupt``, which may raise (the
        process is stopping), and is otherwise retried.
        """
        try:
            return self._receive(timeout)[0]
        except posix_ipc.BusyError:
            return None
        except posix_ipc.SignalError:
            on_interrupt()
            return self.recv_raw(timeout)

    def drain(self) -> int:
        n = 0
        while self.recv_raw(0) is not None:
            n += 1
        return n

    def close(self) -> None:
        try:
            self.mq.close()
        except posix_ipc.Error:
            pass

    @staticmethod
    def unlink(name: str) -> None:
        try:
            posix_ipc.unlink_message_queue(name)
        except posix_ipc.ExistentialError:
            pass
