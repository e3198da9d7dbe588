"""The backend's host side, where vhost-user-bridge.c has its UDP socket: the run's tap
(``--netdev tap``, one queue of a multiqueue tap per queue pair, frames with their vnet
header as the tap reads and writes them) or libslirp (``--netdev user``, plain frames).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable

from common.libslirp import Slirp
from common.tap_linux import tap_fd_set_vnet_hdr_len, tap_open

TAP_BUFSIZE = 4096 + 65536


class TapBackend:
    """The tap's fds, one per queue pair; frames carry the vnet header both ways."""

    with_hdr = True

    def __init__(self, ifname: str, pairs: int) -> None:
        self.fds: list[int] = []
        try:
            for _ in range(pairs):
                self.fds.append(tap_open(ifname, vnet_hdr=True, mq_required=pairs > 1))
        except OSError:
            self.close()
            raise
        self.buf = bytearray(TAP_BUFSIZE)
        self.view = memoryview(self.buf)

    def set_vnet_hdr_len(self, length: int) -> None:
        for fd in self.fds:
            tap_fd_set_vnet_hdr_len(fd, length)

    def send(self, pair: int, sg: list[memoryview], hdrlen: int) -> bool:
        """One frame (vnet header first) to the tap; False when it would block (dropped)."""
        try:
            os.writev(self.fds[pair], sg)
        except BlockingIOError:
            return False
        except OSError:
            return False
        return True

    def recv(self, pair: int) -> memoryview | None:
        """The next frame the tap has for this pair, in the shared buffer; None if none."""
        try:
            n = os.readv(self.fds[pair], [self.buf])
        except (BlockingIOError, InterruptedError):
            return None
        return self.view[:n]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class SlirpBackend:
    """libslirp: frames from the guest go to ``slirp_input``; what it sends back waits in
    ``pending`` for the pair the flow came in on."""

    with_hdr = False

    def __init__(self, pairs: int, on_frame: Callable[[int], None]) -> None:
        self.pending: list[deque[bytes]] = [deque() for _ in range(pairs)]
        self.on_frame = on_frame
        self.slirp = Slirp(self._send_packet)

    def _send_packet(self, frame: bytes, queue: int) -> int:
        q = queue if queue < len(self.pending) else 0
        self.pending[q].append(bytes(frame))
        self.on_frame(q)
        return len(frame)

    def set_vnet_hdr_len(self, length: int) -> None:
        pass

    def send(self, pair: int, sg: list[memoryview], hdrlen: int) -> bool:
        frame = b"".join(sg)[hdrlen:]
        self.slirp.input_queue = pair
        self.slirp.slirp_input(frame)
        return True

    def close(self) -> None:
        self.slirp.cleanup()
