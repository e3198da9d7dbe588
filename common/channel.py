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
        self._send(packb(record))

    def send_raw(self, data: bytes, timeout: float | None = None) -> None:
        """Send a pre-encoded record (the hot paths pack their constant records once)."""
        self._send(data, timeout)

    def recv(self, timeout: float | None = None) -> list | None:
        """The next record; None if ``timeout`` passes first."""
        try:
            data, _ = self._receive(timeout)
        except posix_ipc.BusyError:
            return None
        return unpackb(data)

    def recv_raw(self, timeout: float | None = None) -> bytes | None:
        try:
            return self._receive(timeout)[0]
        except posix_ipc.BusyError:
            return None

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
