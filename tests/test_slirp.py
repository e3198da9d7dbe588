"""libslirp never holds the guest back: a datagram the host socket refuses is dropped and
counted, and ``net_slirp_receive`` takes every frame (it never returns 0, which would park
the frame in the net queue and virtio-net's element in ``async_tx``)."""

from __future__ import annotations

import socket

import pytest

from common.inet import ETH, ETH_P_IP, IPPROTO_UDP, IPV4, UDP, csum_fold, csum_partial, ip_aton
from qemuproc.net import NetClientInfo, qemu_new_net_client
from qemuproc.slirp import Slirp, SlirpState, net_slirp_receive

GUEST_MAC = bytes.fromhex("525400123456")


def udp_frame(sport: int, dport: int, payload: bytes) -> bytes:
    src, dst = ip_aton("10.0.2.15"), ip_aton("10.0.2.2")
    udp = UDP.pack(sport, dport, 8 + len(payload), 0) + payload  # no UDP checksum
    hdr = bytearray(IPV4.pack(0x45, 0, 20 + len(udp), 1, 0, 64, IPPROTO_UDP, 0, src, dst))
    hdr[10:12] = csum_fold(csum_partial(hdr)).to_bytes(2, "big")
    return ETH.pack(bytes.fromhex("52550a000202"), GUEST_MAC, ETH_P_IP) + bytes(hdr) + udp


@pytest.mark.timeout(10)
def test_a_datagram_the_socket_refuses_is_dropped_not_queued() -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    slirp = Slirp(lambda frame, queue: len(frame))
    nc = qemu_new_net_client(NetClientInfo("user", net_slirp_receive), None, "user", "n0")
    nc.opaque = SlirpState(nc, slirp)
    try:
        first = udp_frame(4000, port, b"one")
        assert net_slirp_receive(nc, first) == len(first)
        assert sink.recv(100) == b"one"
        so = slirp.udb[(ip_aton("10.0.2.15"), 4000)]
        so.s.close()  # the host socket refuses every send now (EBADF; EAGAIN takes this path)
        second = udp_frame(4000, port, b"two")
        assert net_slirp_receive(nc, second) == len(second)  # taken all the same
        assert slirp.stats["udp_send_errors"] == 1 and slirp.stats["udp_sent"] == 1
        assert not nc.receive_disabled and not nc.incoming_queue.packets
    finally:
        slirp.cleanup()
        sink.close()
