"""Stands for hw/virtio/vhost-user.c: the vhost-user back end's ``VhostOps`` (``user_ops``),
messages on the chardev's Unix socket (docs/interop/vhost-user.rst).

``vhost_user_backend_init`` learns the back end's features and protocol features, acks the
protocol features the replica implements and asks the queue count (GET_QUEUE_NUM, with MQ).
Every other op is one message: ``vhost_user_write`` sends the header and payload with any fds
as SCM_RIGHTS, ``vhost_user_read`` takes a reply. With REPLY_ACK, SET_MEM_TABLE waits for
the back end's ack (``process_message_reply``). Guest RAM is one region: guest-physical 0,
the RAM's size, QEMU's own mapping address (``userspace_addr``: ring addresses in
SET_VRING_ADDR are in this space) and the shared-memory segment's fd at offset 0. Kick, call
and error files are real eventfds (common/eventfd.py).

A back end that hangs or answers out of turn is cut off: a reply that does not come within
``VHOST_USER_REPLY_TIMEOUT_S``, or a wrong one, fails the op and shuts the socket, so the
chardev reports the connection closed and net/vhost-user.c takes the link down.
"""

from __future__ import annotations

import mmap
import os
import socket
from typing import Any

from common.vhost_user_abi import (
    INFLIGHT,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    VRING_ADDR,
    VRING_STATE,
    VhostUserMemoryRegion,
    VhostUserMsg,
    VhostUserProtocolFeature,
    VhostUserRequest,
    pack_memory,
    recv_msg,
    send_msg,
)
from common.vhost_user_abi import VHOST_MEMORY_BASELINE_NREGIONS as VHOST_USER_MAX_RAM_SLOTS
from qemuproc.char_socket import SocketChardev
from qemuproc.vhost_backend import VhostOps

VHOST_USER_REPLY_TIMEOUT_S = 10.0
VHOST_USER_PROTOCOL_FEATURE_MASK = (
    (1 << VhostUserProtocolFeature.MQ) | (1 << VhostUserProtocolFeature.REPLY_ACK))
"""The protocol features the replica's front-end implements (QEMU 7.2 acks more: see the
deviation list)."""
SHM_DIR = "/dev/shm"


class VhostUserError(OSError):
    pass


class VhostUserState:
    """include/hw/virtio/vhost-user.h's VhostUserState: the chardev all queue pairs share."""

    def __init__(self, chr: SocketChardev) -> None:
        self.chr = chr
        self.memory_slots = VHOST_USER_MAX_RAM_SLOTS
        self.messages = 0


class VhostUser:
    """struct vhost_user: one vhost_dev's view of the shared VhostUserState."""

    def __init__(self, user: VhostUserState) -> None:
        self.user = user
        self.inflight_fd = -1
        self.inflight: mmap.mmap | None = None
        self.calls = 0  # messages this device sent

    def close(self) -> None:
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if self.inflight_fd >= 0:
            os.close(self.inflight_fd)
            self.inflight_fd = -1


def _sock(dev: Any) -> socket.socket:
    sock = dev.backend.user.chr.sock
    if sock is None:
        raise VhostUserError(104, "vhost-user back end not connected")
    return sock


def _cut_off(sock: socket.socket) -> None:
    """Shut the connection so the chardev's hang-up handler closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def vhost_user_write(dev: Any, msg: VhostUserMsg, fds: list[int] | None = None) -> None:
    sock = _sock(dev)
    msg.fds = fds or []
    try:
        send_msg(sock, msg)
    except OSError as e:
        raise VhostUserError(e.errno or 32, f"vhost_user_write: {e.strerror or e}") from None
    dev.backend.user.messages += 1
    dev.backend.calls += 1


def vhost_user_read(dev: Any, request: int) -> VhostUserMsg:
    """The reply to ``request``: the REPLY flag, version 1, the same request number; any fd
    it brought that nobody asked for is closed."""
    sock = _sock(dev)
    sock.settimeout(VHOST_USER_REPLY_TIMEOUT_S)
    try:
        msg = recv_msg(sock)
    except (EOFError, ValueError, OSError) as e:
        _cut_off(sock)
        raise VhostUserError(5, f"vhost_user_read: {e}") from None
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass
    if msg.flags != (VHOST_USER_REPLY_MASK | VHOST_USER_VERSION) or msg.request != request:
        for fd in msg.fds:
            os.close(fd)
        _cut_off(sock)
        raise VhostUserError(71, f"Received unexpected msg type. Expected {request} received "
                                 f"{msg.request} (flags 0x{msg.flags:x})")
    return msg


def process_message_reply(dev: Any, msg: VhostUserMsg) -> None:
    """REPLY_ACK: the back end's u64 answer, 0 for success."""
    if not msg.flags & VHOST_USER_NEED_REPLY_MASK:
        return
    reply = vhost_user_read(dev, msg.request)
    if len(reply.payload) != U64.size:
        raise VhostUserError(71, "Received bad msg size.")
    if reply.u64():
        raise VhostUserError(5, f"vhost-user request {msg.request}: back end answered "
                                f"{reply.u64()}")


def _has_protocol(dev: Any, bit: int) -> bool:
    return bool(dev.protocol_features >> bit & 1)


def vhost_user_write_sync(dev: Any, msg: VhostUserMsg, wait_for_reply: bool,
                          fds: list[int] | None = None) -> None:
    if wait_for_reply and _has_protocol(dev, VhostUserProtocolFeature.REPLY_ACK):
        msg.flags |= VHOST_USER_NEED_REPLY_MASK
    vhost_user_write(dev, msg, fds)
    if wait_for_reply:
        if msg.flags & VHOST_USER_NEED_REPLY_MASK:
            process_message_reply(dev, msg)
        else:  # no ack to wait for: a GET_FEATURES round trip says the message was taken
            vhost_user_get_features(dev)


def vhost_user_get_u64(dev: Any, request: int) -> int:
    vhost_user_write(dev, VhostUserMsg(request))
    reply = vhost_user_read(dev, request)
    if len(reply.payload) != U64.size:
        raise VhostUserError(71, "Received bad msg size.")
    return reply.u64()


def vhost_user_set_u64(dev: Any, request: int, u64: int, wait_for_reply: bool = False) -> None:
    vhost_user_write_sync(dev, VhostUserMsg(request, payload=U64.pack(u64)), wait_for_reply)


def vhost_user_get_features(dev: Any) -> int:
    return vhost_user_get_u64(dev, VhostUserRequest.GET_FEATURES)


def vhost_user_set_features(dev: Any, features: int) -> None:
    """The acked features plus the back-end-only bit (VHOST_USER_F_PROTOCOL_FEATURES)."""
    vhost_user_set_u64(dev, VhostUserRequest.SET_FEATURES, features | dev.backend_features)


def vhost_user_set_protocol_features(dev: Any, features: int) -> None:
    vhost_user_set_u64(dev, VhostUserRequest.SET_PROTOCOL_FEATURES, features)


def vhost_user_set_owner(dev: Any) -> None:
    vhost_user_write(dev, VhostUserMsg(VhostUserRequest.SET_OWNER))


def vhost_user_backend_init(dev: Any) -> None:
    features = vhost_user_get_features(dev)
    dev.max_queues = 1
    if features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
        dev.backend_features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        protocol = vhost_user_get_u64(dev, VhostUserRequest.GET_PROTOCOL_FEATURES)
        dev.protocol_features = protocol & VHOST_USER_PROTOCOL_FEATURE_MASK
        vhost_user_set_protocol_features(dev, dev.protocol_features)
        if _has_protocol(dev, VhostUserProtocolFeature.MQ):
            dev.max_queues = vhost_user_get_u64(dev, VhostUserRequest.GET_QUEUE_NUM)
            if dev.max_queues < 1:
                raise VhostUserError(22, "The maximum number of queues supported by the "
                                         f"backend is {dev.max_queues}")


def vhost_user_backend_cleanup(dev: Any) -> None:
    dev.backend.close()


def qemu_ram_get_host_addr(mem: Any) -> int:
    """QEMU's virtual address of the guest-RAM mapping (RAMBlock's ``host``)."""
    return mem.host_addr()


def vhost_user_set_mem_table(dev: Any, vdev: Any) -> None:
    """One region, guest RAM, by the shared-memory segment's fd (memory_region_from_host)."""
    mem = vdev.dma
    dev.userspace_base = qemu_ram_get_host_addr(mem)
    region = VhostUserMemoryRegion(guest_phys_addr=0, memory_size=mem.size,
                                   userspace_addr=dev.userspace_base, mmap_offset=0)
    fd = os.open(os.path.join(SHM_DIR, mem.name.lstrip("/")), os.O_RDWR | os.O_CLOEXEC)
    try:
        msg = VhostUserMsg(VhostUserRequest.SET_MEM_TABLE, payload=pack_memory([region]))
        if _has_protocol(dev, VhostUserProtocolFeature.REPLY_ACK):
            msg.flags |= VHOST_USER_NEED_REPLY_MASK
        vhost_user_write(dev, msg, [fd])
    finally:
        os.close(fd)
    process_message_reply(dev, msg)


def vhost_set_vring(dev: Any, request: int, index: int, num: int) -> None:
    vhost_user_write(dev, VhostUserMsg(request, payload=VRING_STATE.pack(index, num)))


def vhost_user_set_vring_num(dev: Any, index: int, num: int) -> None:
    vhost_set_vring(dev, VhostUserRequest.SET_VRING_NUM, index, num)


def vhost_user_set_vring_base(dev: Any, index: int, num: int) -> None:
    vhost_set_vring(dev, VhostUserRequest.SET_VRING_BASE, index, num)


def vhost_user_set_vring_enable(dev: Any, enable: bool) -> None:
    """Every queue of the device on or off (only with VHOST_USER_F_PROTOCOL_FEATURES)."""
    if not dev.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
        raise VhostUserError(22, "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
    for i in range(dev.nvqs):
        vhost_set_vring(dev, VhostUserRequest.SET_VRING_ENABLE, dev.vq_index + i, int(enable))


def vhost_user_set_vring_addr(dev: Any, index: int, desc: int, avail: int, used: int) -> None:
    payload = VRING_ADDR.pack(index, 0, desc, used, avail, 0)
    vhost_user_write_sync(dev, VhostUserMsg(VhostUserRequest.SET_VRING_ADDR, payload=payload),
                          False)


def vhost_user_get_vring_base(dev: Any, index: int) -> int:
    vhost_user_write(dev, VhostUserMsg(VhostUserRequest.GET_VRING_BASE,
                                       payload=VRING_STATE.pack(index, 0)))
    reply = vhost_user_read(dev, VhostUserRequest.GET_VRING_BASE)
    if len(reply.payload) != VRING_STATE.size:
        raise VhostUserError(71, "Received bad msg size.")
    return VRING_STATE.unpack(reply.payload)[1]


def vhost_set_vring_file(dev: Any, request: int, index: int, notifier: Any) -> None:
    """A queue's eventfd as SCM_RIGHTS, or NOFD when there is none."""
    u64 = index & VHOST_USER_VRING_IDX_MASK
    fds = []
    if notifier is not None and notifier.fileno() > 0:
        fds.append(notifier.fileno())
    else:
        u64 |= VHOST_USER_VRING_NOFD_MASK
    vhost_user_write(dev, VhostUserMsg(request, payload=U64.pack(u64)), fds)


def vhost_user_set_vring_kick(dev: Any, index: int, notifier: Any) -> None:
    vhost_set_vring_file(dev, VhostUserRequest.SET_VRING_KICK, index, notifier)


def vhost_user_set_vring_call(dev: Any, index: int, notifier: Any) -> None:
    vhost_set_vring_file(dev, VhostUserRequest.SET_VRING_CALL, index, notifier)


def vhost_user_set_vring_err(dev: Any, index: int, notifier: Any) -> None:
    vhost_set_vring_file(dev, VhostUserRequest.SET_VRING_ERR, index, notifier)


def vhost_user_get_vq_index(dev: Any, idx: int) -> int:
    if not dev.vq_index <= idx < dev.vq_index + dev.nvqs:
        raise VhostUserError(22, f"queue {idx} not in this vhost device")
    return idx


def vhost_user_get_inflight_fd(dev: Any, queue_size: int) -> tuple[int, int]:
    """GET_INFLIGHT_FD: the back end's inflight area, mapped here; (mmap_size, mmap_offset)."""
    if not _has_protocol(dev, VhostUserProtocolFeature.INFLIGHT_SHMFD):
        return 0, 0
    vhost_user_write(dev, VhostUserMsg(VhostUserRequest.GET_INFLIGHT_FD,
                                       payload=INFLIGHT.pack(0, 0, dev.nvqs, queue_size)))
    reply = vhost_user_read(dev, VhostUserRequest.GET_INFLIGHT_FD)
    if len(reply.payload) != INFLIGHT.size or len(reply.fds) != 1:
        for fd in reply.fds:
            os.close(fd)
        raise VhostUserError(71, "Received bad msg size.")
    mmap_size, mmap_offset, _, _ = INFLIGHT.unpack(reply.payload)
    u = dev.backend
    u.close()
    u.inflight_fd = reply.fds[0]
    if mmap_size:
        u.inflight = mmap.mmap(u.inflight_fd, mmap_size, offset=mmap_offset)
    return mmap_size, mmap_offset


def vhost_user_set_inflight_fd(dev: Any, queue_size: int, mmap_size: int,
                               mmap_offset: int) -> None:
    """SET_INFLIGHT_FD: the area back to a back end that (re)connected."""
    u = dev.backend
    if not _has_protocol(dev, VhostUserProtocolFeature.INFLIGHT_SHMFD) or u.inflight_fd < 0:
        return
    vhost_user_write(dev, VhostUserMsg(
        VhostUserRequest.SET_INFLIGHT_FD,
        payload=INFLIGHT.pack(mmap_size, mmap_offset, dev.nvqs, queue_size)), [u.inflight_fd])


user_ops = VhostOps(
    backend_type="user",
    vhost_backend_init=vhost_user_backend_init,
    vhost_backend_cleanup=vhost_user_backend_cleanup,
    vhost_set_owner=vhost_user_set_owner,
    vhost_get_features=vhost_user_get_features,
    vhost_set_features=vhost_user_set_features,
    vhost_set_mem_table=vhost_user_set_mem_table,
    vhost_set_vring_num=vhost_user_set_vring_num,
    vhost_set_vring_addr=vhost_user_set_vring_addr,
    vhost_set_vring_base=vhost_user_set_vring_base,
    vhost_get_vring_base=vhost_user_get_vring_base,
    vhost_set_vring_kick=vhost_user_set_vring_kick,
    vhost_set_vring_call=vhost_user_set_vring_call,
    vhost_set_vring_err=vhost_user_set_vring_err,
    vhost_get_vq_index=vhost_user_get_vq_index,
    vhost_set_vring_enable=vhost_user_set_vring_enable,
    vhost_get_inflight_fd=vhost_user_get_inflight_fd,
    vhost_set_inflight_fd=vhost_user_set_inflight_fd,
)
"""vhost-user.c's ``user_ops``."""
