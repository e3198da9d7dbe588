"""Stands for net/tap-linux.c: opening a Linux tap (``tap_open``) and the TUN ioctls that
set its queue, send buffer, vnet header length and offloads. QEMU's tap net client
(qemuproc/tap.py) and the vhost-user backend (vhostuserproc) both use it.
"""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETSNDBUF = 0x400454D4
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNGETFEATURES = 0x800454CF
TUNSETQUEUE = 0x400454D9
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
IFNAMSIZ = 16
IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")
SNDBUF_DEFAULT = 0x7FFFFFFF  # INT_MAX: sndbuf= not given


def tap_open(ifname: str, vnet_hdr: bool = True, mq_required: bool = False) -> int:
    """Open /dev/net/tun and attach to ``ifname`` (made if missing): a non-blocking fd; with
    ``mq_required`` one queue of a multiqueue tap (IFF_MULTI_QUEUE)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0) \
            | (IFF_MULTI_QUEUE if mq_required else 0)
        fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(ifname.encode(), flags))
        os.set_blocking(fd, False)
    except OSError:
        os.close(fd)
        raise
    return fd


def tap_fd_enable(fd: int) -> int:
    """This queue of a multiqueue tap takes frames again (TUNSETQUEUE IFF_ATTACH_QUEUE)."""
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, IFREQ.pack(b"", IFF_ATTACH_QUEUE))
    except OSError as e:
        return -e.errno
    return 0


def tap_fd_disable(fd: int) -> int:
    """The kernel steers no frame to this queue any more (TUNSETQUEUE IFF_DETACH_QUEUE)."""
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, IFREQ.pack(b"", IFF_DETACH_QUEUE))
    except OSError as e:
        return -e.errno
    return 0


def tap_set_sndbuf(fd: int, sndbuf: int) -> None:
    fcntl.ioctl(fd, TUNSETSNDBUF, struct.pack("i", min(sndbuf, SNDBUF_DEFAULT)))


def tap_probe_vnet_hdr_len(fd: int, length: int) -> bool:
    """Can the tap take a vnet header of ``length`` bytes? (sets it and puts the old back)"""
    try:
        orig = struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, b"\0" * 4))[0]
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", length))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", orig))
    except OSError:
        return False
    return True


def tap_fd_set_vnet_hdr_len(fd: int, length: int) -> None:
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", length))


def tap_fd_set_offload(fd: int, csum: bool, tso4: bool, tso6: bool, ecn: bool,
                       ufo: bool) -> None:
    offload = 0
    if csum:
        offload |= TUN_F_CSUM
        if tso4:
            offload |= TUN_F_TSO4
        if tso6:
            offload |= TUN_F_TSO6
        if (tso4 or tso6) and ecn:
            offload |= TUN_F_TSO_ECN
        if ufo:
            offload |= TUN_F_UFO
    fcntl.ioctl(fd, TUNSETOFFLOAD, offload)
