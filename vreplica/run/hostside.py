"""Programs on the host side of the link: a UDP sink that checks what arrives, an echo
service. They run in the supervisor's process, on loopback only, or, behind a tap, on the
tap's address 10.0.2.2 inside the run's network namespace (their sockets are made there)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import nullcontext

from common import netns

SEQ_BYTES = 8
SO_RCVBUFFORCE = 33
SINK_RCVBUF = 64 << 20


def big_receive_buffer(sock: socket.socket) -> None:
    """A receive buffer that does not drop what a Python reader is slow to take; beyond
    net.core.rmem_max only root may ask (SO_RCVBUFFORCE)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SINK_RCVBUF)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SINK_RCVBUF)


PATTERN = bytes(range(256)) * 7
ATF_COM = 0x02  # a complete neighbour entry in /proc/net/arp


def expected_payload(seq: int, size: int) -> bytes:
    """What the guest's sender puts in datagram ``seq`` (guestproc.programs.payload)."""
    start = seq & 0xFF
    return seq.to_bytes(SEQ_BYTES, "big") + PATTERN[start : start + max(0, size - SEQ_BYTES)]


class UdpService:
    """A UDP socket on 127.0.0.1:port served by a thread; ``handle`` sees every datagram.
    A subclass sets up its own state, then calls ``serve``."""

    thread_name = "udp-service"

    def __init__(self, port: int = 0, ns: str | None = None) -> None:
        with netns.entered(ns) if ns else nullcontext():
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        big_receive_buffer(self.sock)
        self.sock.bind((netns.HOST_ADDR if ns else "127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._reading = threading.Event()
        self._reading.set()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def serve(self) -> None:
        self._thread.start()

    def pause(self) -> None:
        """Stop reading the socket, as a stopped process would: what comes waits in its
        receive buffer (a datagram already being read is still served)."""
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    def _run(self) -> None:
        while not self._stop:
            if not self._reading.wait(0.2):
                continue
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.handle(data, peer)

    def handle(self, data: bytes, peer: tuple[str, int]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop = True
        if self._thread.is_alive():
            self._thread.join(1.0)
        self.sock.close()


class UdpSink(UdpService):
    """Receives the guest's datagrams on 127.0.0.1:port and checks each one's payload."""

    thread_name = "udp-sink"

    def __init__(self, port: int = 0, size: int | None = None, ns: str | None = None) -> None:
        super().__init__(port, ns)
        self.size = size
        self.seqs: list[int] = []
        self.bad = 0
        self.first_ns = 0
        self.last_ns = 0
        self.serve()

    def handle(self, data: bytes, peer: tuple[str, int]) -> None:
        now = time.monotonic_ns()
        if not self.first_ns:
            self.first_ns = now
        self.last_ns = now
        seq = int.from_bytes(data[:SEQ_BYTES], "big") if len(data) >= SEQ_BYTES else -1
        if self.size is not None and data != expected_payload(seq, self.size):
            self.bad += 1
        self.seqs.append(seq)

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.seqs) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.seqs) >= n

    def summary(self) -> dict:
        seen = set(self.seqs)
        return {"received": len(self.seqs), "unique": len(seen), "bad_payloads": self.bad,
                "duplicates": len(self.seqs) - len(seen),
                "in_order": self.seqs == sorted(self.seqs)}

class UdpEcho(UdpService):
    """A UDP echo service on 127.0.0.1:port: every datagram goes straight back."""

    thread_name = "udp-echo"

    def __init__(self, port: int = 0, ns: str | None = None, record: bool = False) -> None:
        super().__init__(port, ns)
        self.record = record
        self.times: dict[int, tuple[int, int]] = {}  # with record: seq -> (got, answered) ns
        self.echoed = 0
        self.serve()

    def handle(self, data: bytes, peer: tuple[str, int]) -> None:
        got = time.monotonic_ns() if self.record else 0
        self.sock.sendto(data, peer)
        self.echoed += 1
        if self.record:
            self.times[int.from_bytes(data[:SEQ_BYTES], "big")] = (got, time.monotonic_ns())


class UdpSender:
    """A host program sending ``n`` datagrams to 127.0.0.1:port (toward a hostfwd)."""

    def __init__(self, port: int, n: int, size: int, pace_every: int = 64,
                 ns: str | None = None) -> None:
        self.port = port
        self.ns = ns
        self.dest = netns.GUEST_ADDR if ns else "127.0.0.1"
        self.n = n
        self.size = size
        self.pace_every = pace_every
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="udp-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with netns.entered(self.ns) if self.ns else nullcontext():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            for seq in range(self.n):
                s.sendto(expected_payload(seq, self.size), (self.dest, self.port))
                self.sent += 1
                if seq == 0 and self.ns:
                    self.wait_neighbour()
                if self.pace_every and seq % self.pace_every == self.pace_every - 1:
                    time.sleep(0.001)

    def wait_neighbour(self, timeout: float = 5.0) -> bool:
        """Behind a tap the kernel resolves the guest by ARP first, holding only about 200 KB
        of datagrams meanwhile (unres_qlen_bytes): let the first one resolve it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with netns.entered(self.ns):  # type: ignore[arg-type]
                table = open("/proc/thread-self/net/arp").read().splitlines()[1:]
            for row in table:
                f = row.split()
                if f[0] == self.dest and int(f[2], 16) & ATF_COM:
                    return True
            time.sleep(0.002)
        return False

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)
