"""Stands for the vhost-user wire protocol (QEMU's docs/interop/vhost-user.rst; the enums of
hw/virtio/vhost-user.c and subprojects/libvhost-user/libvhost-user.h): message numbers, the
12-byte header, the payload layouts, and a message's file descriptors as SCM_RIGHTS.

Both ends use it: the replica's QEMU as front-end (qemuproc) and its backend (vhostuserproc),
and either end may be a real peer (DPDK's lib/vhost or virtio-user, a real QEMU), so every
layout here is the wire's byte for byte, in the host's byte order (little-endian on x86).
"""

from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import dataclass, field
from enum import IntEnum


class VhostUserRequest(IntEnum):
    """Front-end to backend requests (``VhostUserRequest``)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class VhostUserSlaveRequest(IntEnum):
    """Backend to front-end requests on the slave channel (``VhostUserSlaveRequest``)."""

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class VhostUserProtocolFeature(IntEnum):
    """Bits of GET/SET_PROTOCOL_FEATURES (``VhostUserProtocolFeature``)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    SLAVE_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    SLAVE_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


VHOST_USER_F_PROTOCOL_FEATURES = 30
"""The virtio feature bit (unused by virtio itself) that says GET_PROTOCOL_FEATURES exists."""

VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x1 << 2
VHOST_USER_NEED_REPLY_MASK = 0x1 << 3
VHOST_USER_VERSION = 0x1

VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x1 << 8
"""SET_VRING_KICK/CALL/ERR's u64: the queue index, and this bit when no fd comes with it."""

VHOST_MEMORY_BASELINE_NREGIONS = 8
"""The most regions one SET_MEM_TABLE carries (and so the most fds it may bring)."""
VHOST_USER_MAX_CONFIG_SIZE = 256

VHOST_VRING_F_LOG = 0
"""vhost_vring_addr.flags: log used-ring writes (migration's dirty log)."""

VHOST_USER_HDR = struct.Struct("<III")
"""request, flags, size (of the payload that follows)."""
VHOST_USER_HDR_SIZE = VHOST_USER_HDR.size
VHOST_USER_PAYLOAD_MAX = 4096
"""No payload this replica sends or accepts is larger; libvhost-user's bound is its union."""

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
"""``struct vhost_vring_state``: index, num."""
VRING_ADDR = struct.Struct("<IIQQQQ")
"""``struct vhost_vring_addr``: index, flags, desc_user_addr, used_user_addr,
avail_user_addr, log_guest_addr."""
MEMORY_HDR = struct.Struct("<II")
"""``VhostUserMemory``'s head: nregions, padding; the regions follow."""
MEMORY_REGION = struct.Struct("<QQQQ")
"""``VhostUserMemoryRegion``: guest_phys_addr, memory_size, userspace_addr, mmap_offset."""
INFLIGHT = struct.Struct("<QQHH")
"""``VhostUserInflight``: mmap_size, mmap_offset, num_queues, queue_size."""
LOG = struct.Struct("<QQ")
"""``VhostUserLog``: mmap_size, mmap_offset."""


@dataclass(frozen=True)
class VhostUserMemoryRegion:
    """One region of guest RAM as SET_MEM_TABLE describes it; its fd travels beside."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass
class VhostUserMsg:
    """One message: header fields, raw payload, and the fds that came (or go) with it."""

    request: int
    flags: int = VHOST_USER_VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    def u64(self) -> int:
        return U64.unpack_from(self.payload)[0]


def pack_memory(regions: list[VhostUserMemoryRegion]) -> bytes:
    """``VhostUserMemory``: the region count, padding, then each region."""
    out = bytearray(MEMORY_HDR.pack(len(regions), 0))
    for r in regions:
        out += MEMORY_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                  r.mmap_offset)
    return bytes(out)


def unpack_memory(payload: bytes) -> list[VhostUserMemoryRegion]:
    """The regions of a SET_MEM_TABLE payload; ValueError if it is short or claims too many."""
    if len(payload) < MEMORY_HDR.size:
        raise ValueError("SET_MEM_TABLE payload shorter than its header")
    nregions, _ = MEMORY_HDR.unpack_from(payload)
    if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
        raise ValueError(f"SET_MEM_TABLE: {nregions} regions, at most "
                         f"{VHOST_MEMORY_BASELINE_NREGIONS}")
    if len(payload) < MEMORY_HDR.size + nregions * MEMORY_REGION.size:
        raise ValueError("SET_MEM_TABLE payload shorter than its regions")
    return [VhostUserMemoryRegion(*MEMORY_REGION.unpack_from(
        payload, MEMORY_HDR.size + i * MEMORY_REGION.size)) for i in range(nregions)]


def send_msg(sock: socket.socket, msg: VhostUserMsg) -> None:
    """Write one message: header and payload in one sendmsg, its fds as SCM_RIGHTS."""
    data = VHOST_USER_HDR.pack(msg.request, msg.flags, len(msg.payload)) + msg.payload
    anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())]
           if msg.fds else [])
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_msg(sock: socket.socket, max_fds: int = VHOST_MEMORY_BASELINE_NREGIONS) -> VhostUserMsg:
    """Read one message: the header with any fds (SCM_RIGHTS), then exactly ``size`` bytes.

    EOFError when the peer closed; ValueError for a payload larger than any valid one (the
    fds that came with the header are closed first, so a hostile peer cannot leak them in).
    """
    fds = array.array("i")
    hdr, anc, _flags, _ = sock.recvmsg(VHOST_USER_HDR_SIZE,
                                       socket.CMSG_LEN(max_fds * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if not hdr:
        _close_all(fds)
        raise EOFError("vhost-user peer closed the connection")
    while len(hdr) < VHOST_USER_HDR_SIZE:
        more = sock.recv(VHOST_USER_HDR_SIZE - len(hdr))
        if not more:
            _close_all(fds)
            raise EOFError("vhost-user peer closed the connection mid-header")
        hdr += more
    request, flags, size = VHOST_USER_HDR.unpack(hdr)
    if size > VHOST_USER_PAYLOAD_MAX:
        _close_all(fds)
        raise ValueError(f"vhost-user message {request}: payload of {size} bytes")
    payload = b""
    while len(payload) < size:
        more = sock.recv(size - len(payload))
        if not more:
            _close_all(fds)
            raise EOFError("vhost-user peer closed the connection mid-payload")
        payload += more
    return VhostUserMsg(request, flags, payload, list(fds))


def _close_all(fds: array.array) -> None:
    for fd in fds:
        os.close(fd)
