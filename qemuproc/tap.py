"""Stands for net/tap.c and net/tap-linux.c: ``-netdev tap``, a net client on a Linux tap.

``tap_open`` attaches to the tap with TUNSETIFF (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR), sets its
send buffer (TUNSETSNDBUF), and the virtio-net header length (TUNSETVNETHDRSZ) and offloads
(TUNSETOFFLOAD) the NIC asks for. TX: ``tap_receive_iov`` writes the vnet header and the
frame with one writev; a write that would block returns 0, so the net queue keeps the
packet, and ``tap_writable`` (the fd's POLLOUT) flushes it. RX: ``tap_send`` reads frames
off the fd in the main loop and sends them to the NIC; a NIC that cannot take one turns the
fd's read handler off until ``tap_send_completed``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from common.tap_linux import (
    SNDBUF_DEFAULT,
    tap_fd_disable,
    tap_fd_enable,
    tap_fd_set_offload,
    tap_fd_set_vnet_hdr_len,
    tap_open,
    tap_probe_vnet_hdr_len,
    tap_set_sndbuf,
)
from common.trace import traced
from qemuproc.main_loop import MainLoop
from qemuproc.net import (
    NetClientInfo,
    NetClientState,
    qemu_flush_queued_packets,
    qemu_new_net_client,
    qemu_purge_queued_packets,
    qemu_sendv_packet_async,
)

TAP_BUFSIZE = 4096 + 65536  # NET_BUFSIZE
TAP_SEND_BATCH = 50
"""tap_send hands at most this many frames to the NIC per call, not to hog the BQL."""


class TAPState:
    """struct TAPState: the tap's fd, its vnet header state and poll flags."""

    def __init__(self, nc: NetClientState, fd: int, main_loop: MainLoop, vnet_hdr: bool) -> None:
        self.nc = nc
        self.fd = fd
        self.main_loop = main_loop
        self.host_vnet_hdr_len = 10 if vnet_hdr else 0
        self.using_vnet_hdr = False
        self.read_poll = False
        self.write_poll = False
        self.enabled = True
        self.buf = bytearray(TAP_BUFSIZE)
        self.zero_hdr = bytes(12)
        self.offload = (False,) * 5
        self.vhost_net: Any = None  # vhost=on: the VHostNetState (qemuproc/vhost_net.py)
        self.ifname = ""
        self.stats = {"written": 0, "write_eagain": 0, "write_errors": 0, "writable_flushes": 0,
                      "read": 0,
                      "read_stalls": 0}

    def kernel_counters(self) -> dict[str, int]:
        """The tap's own counters in the kernel (/proc/net/dev of the namespace): what the
        host sent toward the guest (tx) and what it dropped for want of room."""
        try:
            for line in open("/proc/thread-self/net/dev").read().splitlines()[2:]:
                name, _, rest = line.partition(":")
                if name.strip() == self.ifname:
                    f = [int(x) for x in rest.split()]
                    return {"rx_packets": f[1], "rx_dropped": f[3], "tx_packets": f[9],
                            "tx_dropped": f[11]}
        except OSError:
            pass
        return {}

    def describe(self) -> dict[str, Any]:
        return {"fd": self.fd, "enabled": self.enabled, "kernel": self.kernel_counters(),
                "vnet_hdr_len": self.host_vnet_hdr_len,
                "using_vnet_hdr": self.using_vnet_hdr, "read_poll": self.read_poll,
                "write_poll": self.write_poll, "offload": dict(zip(
                    ("csum", "tso4", "tso6", "ecn", "ufo"), self.offload, strict=True)),
                "stats": dict(self.stats)}


def tap_update_fd_handler(s: TAPState) -> None:
    s.main_loop.qemu_set_fd_handler(s.fd, tap_send if s.read_poll and s.enabled else None,
                                    tap_writable if s.write_poll else None,
                                    s, "tap")


def tap_read_poll(s: TAPState, enable: bool) -> None:
    s.read_poll = enable
    tap_update_fd_handler(s)


def tap_write_poll(s: TAPState, enable: bool) -> None:
    s.write_poll = enable
    tap_update_fd_handler(s)


def tap_write_packet(s: TAPState, iov: list[memoryview | bytes]) -> int:
    """writev the frame; would-block: watch for POLLOUT and return 0 (the queue keeps it)."""
    while True:
        try:
            n = os.writev(s.fd, iov)
        except InterruptedError:
            continue
        except BlockingIOError:
            s.stats["write_eagain"] += 1
            tap_write_poll(s, True)
            return 0
        except OSError:  # the tap refused the frame (EINVAL: too short, a bad header)
            s.stats["write_errors"] += 1
            return -1
        s.stats["written"] += 1
        return n


@traced
def tap_receive_iov(nc: NetClientState, iov: list[memoryview | bytes]) -> int:
    """A frame from the NIC: with a vnet header the NIC did not write, a zeroed one first."""
    s: TAPState = nc.opaque
    if s.host_vnet_hdr_len and not s.using_vnet_hdr:
        iov = [s.zero_hdr[: s.host_vnet_hdr_len], *iov]
    return tap_write_packet(s, iov)


def tap_receive(nc: NetClientState, buf: memoryview | bytes) -> int:
    return tap_receive_iov(nc, [buf])


@traced
def tap_writable(s: TAPState) -> None:
    """POLLOUT on the tap after a write would have blocked: send what the queue kept."""
    tap_write_poll(s, False)
    s.stats["writable_flushes"] += 1
    qemu_flush_queued_packets(s.nc)


def tap_send_completed(nc: NetClientState, length: int) -> None:
    tap_read_poll(nc.opaque, True)


@traced
def tap_send(s: TAPState) -> None:
    """The tap is readable: up to TAP_SEND_BATCH frames from the host to the NIC."""
    buf = s.buf
    view = memoryview(buf)
    for _ in range(TAP_SEND_BATCH):
        try:
            size = os.readv(s.fd, [buf])
        except (BlockingIOError, InterruptedError):
            break
        except OSError as e:
            if e.errno == errno.EIO:  # the tap went down
                break
            raise
        if size <= 0:
            break
        s.stats["read"] += 1
        frame = view[:size]
        if s.host_vnet_hdr_len and not s.using_vnet_hdr:
            frame = frame[s.host_vnet_hdr_len :]
        ret = qemu_sendv_packet_async(s.nc, [frame], tap_send_completed)
        if ret == 0:  # queued (copied) in the NIC's net queue: stop reading until it goes
            s.stats["read_stalls"] += 1
            tap_read_poll(s, False)
            break
        if ret < 0:
            break


# -- NetClientInfo's vnet header and offload callbacks (tap_has_vnet_hdr, ...) ----------------


def tap_has_vnet_hdr(nc: NetClientState) -> bool:
    return nc.opaque.host_vnet_hdr_len > 0


def tap_has_vnet_hdr_len(nc: NetClientState, length: int) -> bool:
    return tap_has_vnet_hdr(nc) and tap_probe_vnet_hdr_len(nc.opaque.fd, length)


def tap_using_vnet_hdr(nc: NetClientState, using: bool) -> None:
    nc.opaque.using_vnet_hdr = using


def tap_set_vnet_hdr_len(nc: NetClientState, length: int) -> None:
    s: TAPState = nc.opaque
    tap_fd_set_vnet_hdr_len(s.fd, length)
    s.host_vnet_hdr_len = length


def tap_set_offload(nc: NetClientState, csum: bool, tso4: bool, tso6: bool, ecn: bool,
                    ufo: bool) -> None:
    s: TAPState = nc.opaque
    tap_fd_set_offload(s.fd, csum, tso4, tso6, ecn, ufo)
    s.offload = (csum, tso4, tso6, ecn, ufo)


def tap_get_using_vnet_hdr(nc: NetClientState) -> bool:
    return nc.opaque.using_vnet_hdr


def tap_get_vnet_hdr_len(nc: NetClientState) -> int:
    return nc.opaque.host_vnet_hdr_len


def tap_poll(nc: NetClientState, enable: bool) -> None:
    """vhost takes the tap (False) or gives it back (True)."""
    s: TAPState = nc.opaque
    tap_read_poll(s, enable)
    tap_write_poll(s, enable)


def tap_enable(nc: NetClientState) -> int:
    """The guest uses this queue pair: attach the tap queue and read it again."""
    s: TAPState = nc.opaque
    if s.enabled:
        return 0
    ret = tap_fd_enable(s.fd)
    if ret == 0:
        s.enabled = True
        tap_update_fd_handler(s)
    return ret


def tap_disable(nc: NetClientState) -> int:
    """The guest stopped using this queue pair: detach it; what it queued for the NIC goes."""
    s: TAPState = nc.opaque
    if not s.enabled:
        return 0
    ret = tap_fd_disable(s.fd)
    if ret == 0:
        qemu_purge_queued_packets(nc)
        s.enabled = False
        tap_update_fd_handler(s)
    return ret


def tap_cleanup(nc: NetClientState) -> None:
    s: TAPState = nc.opaque
    if s.fd >= 0:
        s.main_loop.qemu_set_fd_handler(s.fd, None, None, None)
        os.close(s.fd)
        s.fd = -1


net_tap_info = NetClientInfo("tap", tap_receive, None, receive_iov=tap_receive_iov,
                             has_vnet_hdr=tap_has_vnet_hdr,
                             has_vnet_hdr_len=tap_has_vnet_hdr_len,
                             using_vnet_hdr=tap_using_vnet_hdr,
                             set_vnet_hdr_len=tap_set_vnet_hdr_len,
                             set_offload=tap_set_offload,
                             get_using_vnet_hdr=tap_get_using_vnet_hdr,
                             get_vnet_hdr_len=tap_get_vnet_hdr_len,
                             poll=tap_poll)


@traced
def net_init_tap(main_loop: MainLoop, ifname: str, name: str, vnet_hdr: bool = True,
                 sndbuf: int = 0, vhost_rundir: str | None = None,
                 poll_us: int = 0, vhost_err_name: Callable[[int], str] | None = None,
                 queues: int = 1) -> list[NetClientState]:
    """``-netdev tap,id=NAME,ifname=IFNAME,script=no,downscript=no[,sndbuf=N][,queues=N]
    [,vhost=on,poll-us=N]``: open each queue of the tap (IFF_MULTI_QUEUE when more than one),
    set its send buffer, start reading it; with vhost, each queue pair's own /dev/vhost-net
    (net_init_tap_one). One net client per queue, all named NAME."""
    ncs: list[NetClientState] = []
    try:
        for i in range(queues):
            ncs.append(net_init_tap_one(main_loop, ifname, name, i, queues > 1, vnet_hdr,
                                        sndbuf, vhost_rundir, poll_us, vhost_err_name))
    except OSError:
        for nc in ncs:
            tap_cleanup(nc)
        raise
    return ncs


def net_init_tap_one(main_loop: MainLoop, ifname: str, name: str, index: int, mq: bool,
                     vnet_hdr: bool, sndbuf: int, vhost_rundir: str | None, poll_us: int,
                     vhost_err_name: Callable[[int], str] | None) -> NetClientState:
    fd = tap_open(ifname, vnet_hdr, mq)
    try:
        tap_set_sndbuf(fd, sndbuf or SNDBUF_DEFAULT)
        if vnet_hdr:
            tap_fd_set_vnet_hdr_len(fd, 10)
            tap_fd_set_offload(fd, False, False, False, False, False)
    except OSError:
        os.close(fd)
        raise
    nc = qemu_new_net_client(net_tap_info, None, "tap", name)
    nc.queue_index = index
    s = TAPState(nc, fd, main_loop, vnet_hdr)
    s.ifname = ifname
    nc.opaque = s
    tap_read_poll(s, True)
    if vhost_rundir is not None:
        from qemuproc.vhost_net import vhost_net_init

        s.vhost_net = vhost_net_init(nc, fd, vhost_rundir, poll_us, main_loop, vhost_err_name)
    return nc
