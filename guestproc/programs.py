"""The programs a run makes the guest execute, over the guest's UDP sockets."""

from __future__ import annotations

from typing import Any

from guestproc.kernel import Kernel
from guestproc.netstack import GuestStack

SEQ_BYTES = 8
GATEWAY = "10.0.2.2"


def payload(seq: int, size: int) -> bytes:
    """Each datagram: its 8-byte big-endian sequence number, then a filler byte pattern."""
    fill = bytes((seq + i) & 0xFF for i in range(max(0, size - SEQ_BYTES)))
    return seq.to_bytes(SEQ_BYTES, "big") + fill


def udp_send(kernel: Kernel, stack: GuestStack, opts: dict[str, Any]) -> dict[str, Any]:
    """Send ``packets`` datagrams of ``size`` bytes to 10.0.2.2:``dest_port``.

    ``pace_ms`` spaces them out (the guest sleeps on its LAPIC timer); ``batch`` > 1 hands
    them to the driver in batches with xmit_more set on all but the last of each.
    """
    n, size, port = opts["packets"], opts["size"], opts["dest_port"]
    pace = opts.get("pace_ms", 0.0)
    batch = max(1, opts.get("batch", 1))
    sock = stack.socket()
    dst = (GATEWAY, port)
    # payloads are made before the clock starts: the run measures the path, not this
    payloads = [payload(i, size) for i in range(n)]
    t0 = kernel.now_ns()
    for seq in range(n):
        sock.sendto(payloads[seq], dst, more=(seq + 1) % batch != 0 and seq + 1 < n)
        if pace:
            kernel.msleep(pace)
    return {"sent": n, "send_ns": kernel.now_ns() - t0, "sport": sock.port}


PROGRAMS = {"tx": udp_send}
