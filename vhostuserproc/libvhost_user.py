"""Stands for subprojects/libvhost-user/libvhost-user.c: the backend half of the vhost-user
protocol (``vu_dispatch`` and its ``vu_*_exec`` handlers), the regions of guest RAM it maps
from the front-end's fds (``vu_set_mem_table_exec``, ``vu_gpa_to_va``, ``qva_to_va``), and
the split virtqueue it serves from them (``vu_queue_pop`` ... ``vu_queue_notify``).

Everything the front-end or the guest writes is checked before use. A value no valid
peer sends ends in ``vu_panic``: the device marks itself broken (every queue operation
becomes a no-op), and its owner closes the connection, as vhost-user-bridge's panic does.

The packed ring (not in libvhost-user) is in vhostuserproc/libvhost_user_packed.py; the
queue functions here hand a packed queue to it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Callable

from common.trace import trace_event
from common.vhost_user_abi import (
    INFLIGHT,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    VRING_ADDR,
    VRING_STATE,
    VhostUserMsg,
    VhostUserProtocolFeature,
    VhostUserRequest,
    send_msg,
    unpack_memory,
)
from common.vhost_user_inflight import (
    INFLIGHT_VERSION,
    VuVirtqInflight,
    vu_inflight_queue_size,
)
from common.virtio_abi import (
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from common.vring import (
    DESC,
    VIRTQUEUE_MAX_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_USED_ELEM_SIZE,
    VRING_USED_F_NO_NOTIFY,
    is_power_of_2,
    vring_need_event,
)
from vhostuserproc.libvhost_user_packed import (
    map_ring_packed,
    vring_packed_notify,
    vu_get_vring_base_packed,
    vu_queue_packed_empty,
    vu_queue_packed_fill,
    vu_queue_packed_flush,
    vu_queue_packed_get_avail_bytes,
    vu_queue_packed_pop,
    vu_queue_packed_rewind,
    vu_queue_packed_set_notification,
    vu_set_vring_base_packed,
)
from vhostuserproc.vu_dev import (
    VuDev,
    VuDevRegion,
    VuInflightInfo,
    VuPanic,
    VuRing,
    VuVirtq,
    VuVirtqElement,
    qva_to_va,
    virtqueue_map_desc,
    vu_gpa_to_va,
    vu_has_feature,
    vu_has_protocol_feature,
    vu_panic,
)

VU_WATCH_IN = 1
trace_vu_dispatch = trace_event("vu_dispatch")
trace_vu_kick_cb = trace_event("vu_kick_cb")
trace_vu_queue_pop = trace_event("vu_queue_pop")
trace_vu_queue_flush = trace_event("vu_queue_flush")
trace_vu_queue_notify = trace_event("vu_queue_notify")
VHOST_USER_MAX_RAM_SLOTS = 8
"""This backend maps at most the baseline's regions (it offers no CONFIGURE_MEM_SLOTS)."""

R = VhostUserRequest
P = VhostUserProtocolFeature


def vu_remove_all_mem_regs(dev: VuDev) -> None:
    for vq in dev.vq:
        unmap_ring(vq)
    for r in dev.regions:
        r.unmap()
    dev.regions = []


# -- the messages -----------------------------------------------------------------------------

def vmsg_close_fds(vmsg: VhostUserMsg) -> None:
    for fd in vmsg.fds:
        os.close(fd)
    vmsg.fds = []


def vmsg_set_reply_u64(vmsg: VhostUserMsg, val: int) -> None:
    vmsg.flags = 0
    vmsg.payload = U64.pack(val & 0xFFFFFFFFFFFFFFFF)
    vmsg.fds = []


def vu_send_reply(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    vmsg.flags = (vmsg.flags & ~VHOST_USER_VERSION_MASK) | VHOST_USER_VERSION \
        | VHOST_USER_REPLY_MASK
    try:
        send_msg(dev.sock, vmsg)  # type: ignore[arg-type]
    except OSError as e:
        vu_panic(dev, f"Error while writing: {e.strerror}")
        return False
    return True


def _u64(vmsg: VhostUserMsg) -> int:
    if len(vmsg.payload) < U64.size:
        raise VuPanic(f"{_name(vmsg.request)}: payload of {len(vmsg.payload)} bytes")
    return U64.unpack_from(vmsg.payload)[0]


def _state(dev: VuDev, vmsg: VhostUserMsg) -> tuple[int, int]:
    if len(vmsg.payload) < VRING_STATE.size:
        raise VuPanic(f"{_name(vmsg.request)}: payload of {len(vmsg.payload)} bytes")
    index, num = VRING_STATE.unpack_from(vmsg.payload)
    if index >= dev.max_queues:
        raise VuPanic(f"Invalid queue index: {index}")
    return index, num


def _name(req: int) -> str:
    try:
        return "VHOST_USER_" + R(req).name
    except ValueError:
        return f"request {req}"


def vu_get_features_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    features = (1 << VIRTIO_F_NOTIFY_ON_EMPTY | 1 << VIRTIO_RING_F_INDIRECT_DESC
                | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_F_VERSION_1
                | 1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << VIRTIO_F_RING_PACKED)
    features |= dev.iface.get_features(dev)
    vmsg_set_reply_u64(vmsg, features)
    return True


def vu_set_enable_all_rings(dev: VuDev, enabled: bool) -> None:
    for vq in dev.vq:
        vq.enable = enabled


def vu_set_features_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    dev.features = _u64(vmsg)
    if not vu_has_feature(dev, VHOST_USER_F_PROTOCOL_FEATURES):
        vu_set_enable_all_rings(dev, True)
    dev.iface.set_features(dev, dev.features)
    return False


def vu_set_owner_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    return False


def vu_reset_device_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    vu_set_enable_all_rings(dev, False)
    return False


def vu_set_mem_table_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    """Unmap the old regions, mmap each new one from its fd (size + mmap_offset from 0, as
    libvhost-user does), close the fds, and remap the rings already given."""
    try:
        regions = unpack_memory(vmsg.payload)
    except ValueError as e:
        vmsg_close_fds(vmsg)
        raise VuPanic(str(e)) from None
    if len(vmsg.fds) != len(regions):
        vmsg_close_fds(vmsg)
        raise VuPanic(f"SET_MEM_TABLE: {len(regions)} regions with {len(vmsg.fds)} fds")
    vu_remove_all_mem_regs(dev)
    error = ""
    for m, fd in zip(regions, vmsg.fds, strict=True):
        if error:
            continue
        if m.memory_size == 0 or m.memory_size + m.mmap_offset > 1 << 47:
            error = f"region mmap error: size {m.memory_size:#x} offset {m.mmap_offset:#x}"
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < m.memory_size + m.mmap_offset:
                error = (f"region of {m.memory_size + m.mmap_offset:#x} bytes on an fd of "
                         f"{st.st_size:#x}")  # touching past the file's end is SIGBUS
                continue
            mp = mmap.mmap(fd, m.memory_size + m.mmap_offset, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            error = f"region mmap error: {e}"
            continue
        dev.regions.append(VuDevRegion(m.guest_phys_addr, m.memory_size, m.userspace_addr,
                                       m.mmap_offset, mp, memoryview(mp)))
    vmsg_close_fds(vmsg)
    if error:
        vu_remove_all_mem_regs(dev)
        raise VuPanic(error)
    for vq in dev.vq:
        if vq.desc_user_addr and map_ring(dev, vq):
            raise VuPanic(f"remapping queue {vq.index} during setmemtable")
    return False


def vu_set_log_base_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    vmsg_close_fds(vmsg)
    raise VuPanic("Unhandled request: VHOST_USER_SET_LOG_BASE (no VHOST_F_LOG_ALL)")


def vu_set_vring_num_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    index, num = _state(dev, vmsg)
    if not 0 < num <= VIRTQUEUE_MAX_SIZE:
        raise VuPanic(f"Invalid vring num {num} for queue {index}")
    dev.vq[index].num = num
    return False


def unmap_ring(vq: VuVirtq) -> None:
    if vq.vring is not None:
        vq.vring.release()
        vq.vring = None
    if vq.packed is not None:
        vq.packed.release()  # type: ignore[attr-defined]
        vq.packed = None


def map_ring(dev: VuDev, vq: VuVirtq) -> bool:
    """Views of the ring's parts at the front-end's addresses; True when any part is not
    wholly inside one region (or the size is not one a ring can have)."""

    unmap_ring(vq)
    n = vq.num
    if vu_has_feature(dev, VIRTIO_F_RING_PACKED):
        return map_ring_packed(dev, vq)
    if not is_power_of_2(n):
        return True
    desc = qva_to_va(dev, vq.desc_user_addr, VRING_DESC_SIZE * n)
    avail = qva_to_va(dev, vq.avail_user_addr, 2 * (3 + n))
    used = qva_to_va(dev, vq.used_user_addr, 6 + VRING_USED_ELEM_SIZE * n)
    if desc is None or avail is None or used is None or vq.avail_user_addr & 1 \
            or vq.used_user_addr & 3:
        for v in (desc, avail, used):
            if v is not None:
                v.release()
        return True
    vq.vring = VuRing(n, desc, avail.cast("H"), used[:4].cast("H"),
                      used[4 : 4 + VRING_USED_ELEM_SIZE * n].cast("I"),
                      used[4 + VRING_USED_ELEM_SIZE * n :].cast("H"))
    avail.release()
    used.release()
    return False


def vu_set_vring_addr_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    if len(vmsg.payload) < VRING_ADDR.size:
        raise VuPanic(f"SET_VRING_ADDR: payload of {len(vmsg.payload)} bytes")
    index, flags, desc, used, avail, log = VRING_ADDR.unpack_from(vmsg.payload)
    if index >= dev.max_queues:
        raise VuPanic(f"Invalid queue index: {index}")
    vq = dev.vq[index]
    vq.desc_user_addr, vq.used_user_addr, vq.avail_user_addr = desc, used, avail
    vq.log_guest_addr = log
    if map_ring(dev, vq):
        raise VuPanic("Invalid vring_addr message")
    if vq.vring is not None:
        vq.used_idx = vq.vring.used_hdr[1]
        if vq.last_avail_idx != vq.used_idx \
                and dev.iface.queue_is_processed_in_order(dev, index):
            vq.shadow_avail_idx = vq.last_avail_idx = vq.used_idx
    return False


def vu_set_vring_base_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:

    index, num = _state(dev, vmsg)
    vq = dev.vq[index]
    if vu_has_feature(dev, VIRTIO_F_RING_PACKED):
        vu_set_vring_base_packed(vq, num)
    else:
        vq.shadow_avail_idx = vq.last_avail_idx = num & 0xFFFF
    return False


def vu_get_vring_base_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    """The queue's next avail index for the front-end to keep; the queue stops, its kick and
    call fds close."""

    index, _ = _state(dev, vmsg)
    vq = dev.vq[index]
    num = (vu_get_vring_base_packed(vq) if vq.packed is not None
           else vq.last_avail_idx)
    vmsg.payload = VRING_STATE.pack(index, num)
    vmsg.fds = []
    vq.started = False
    dev.iface.queue_set_started(dev, index, False)
    if vq.call_fd != -1:
        os.close(vq.call_fd)
        vq.call_fd = -1
    if vq.kick_fd != -1:
        dev.remove_watch(vq.kick_fd)
        os.close(vq.kick_fd)
        vq.kick_fd = -1
    return True


def vu_check_queue_msg_file(dev: VuDev, vmsg: VhostUserMsg) -> tuple[int, bool]:
    try:
        u = _u64(vmsg)
    except VuPanic:
        vmsg_close_fds(vmsg)
        raise
    index, nofd = u & VHOST_USER_VRING_IDX_MASK, bool(u & VHOST_USER_VRING_NOFD_MASK)
    if index >= dev.max_queues:
        vmsg_close_fds(vmsg)
        raise VuPanic(f"Invalid queue index: {index}")
    if nofd:
        vmsg_close_fds(vmsg)
    elif len(vmsg.fds) != 1:
        vmsg_close_fds(vmsg)
        raise VuPanic(f"Invalid fds in request: {vmsg.request}")
    return index, nofd


def vu_kick_cb(dev: VuDev, condition: int, index: int) -> None:
    vq = dev.vq[index]
    try:
        os.eventfd_read(vq.kick_fd)
    except BlockingIOError:
        return
    except OSError as e:
        dev.remove_watch(vq.kick_fd)
        vu_panic(dev, f"kick eventfd_read(): {e.strerror}")
        return
    vq.kicks += 1
    if trace_vu_kick_cb.on:
        trace_vu_kick_cb(index=index)
    if vq.handler is not None:
        vq.handler(dev, index)


def vu_set_vring_kick_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    index, nofd = vu_check_queue_msg_file(dev, vmsg)
    vq = dev.vq[index]
    if vq.kick_fd != -1:
        dev.remove_watch(vq.kick_fd)
        os.close(vq.kick_fd)
        vq.kick_fd = -1
    vq.kick_fd = -1 if nofd else vmsg.fds[0]
    vmsg.fds = []
    if vq.kick_fd != -1:
        os.set_blocking(vq.kick_fd, False)
    vq.started = True
    dev.iface.queue_set_started(dev, index, True)
    if vq.kick_fd != -1 and vq.handler is not None:
        dev.set_watch(vq.kick_fd, VU_WATCH_IN, vu_kick_cb, index)
    if vu_check_queue_inflights(dev, vq):
        raise VuPanic(f"Failed to check inflights for vq: {index}")
    return False


def vu_set_queue_handler(dev: VuDev, vq: VuVirtq,
                         handler: Callable[[VuDev, int], None] | None) -> None:
    vq.handler = handler
    if vq.kick_fd >= 0:
        if handler is not None:
            dev.set_watch(vq.kick_fd, VU_WATCH_IN, vu_kick_cb, vq.index)
        else:
            dev.remove_watch(vq.kick_fd)


def vu_set_vring_call_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    index, nofd = vu_check_queue_msg_file(dev, vmsg)
    vq = dev.vq[index]
    if vq.call_fd != -1:
        os.close(vq.call_fd)
        vq.call_fd = -1
    vq.call_fd = -1 if nofd else vmsg.fds[0]
    vmsg.fds = []
    if vq.call_fd != -1:  # in case of I/O hang after reconnecting
        os.set_blocking(vq.call_fd, False)
        _eventfd_write(dev, vq.call_fd)
    return False


def vu_set_vring_err_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    index, nofd = vu_check_queue_msg_file(dev, vmsg)
    vq = dev.vq[index]
    if vq.err_fd != -1:
        os.close(vq.err_fd)
    vq.err_fd = -1 if nofd else vmsg.fds[0]
    vmsg.fds = []
    return False


def vu_get_protocol_features_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    features = 1 << P.MQ | 1 << P.REPLY_ACK | 1 << P.INFLIGHT_SHMFD
    features |= dev.iface.get_protocol_features(dev)
    vmsg_set_reply_u64(vmsg, features)
    return True


def vu_set_protocol_features_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    dev.protocol_features = _u64(vmsg)
    return False


def vu_get_queue_num_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    vmsg_set_reply_u64(vmsg, dev.max_queues)
    return True


def vu_set_vring_enable_exec(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    index, enable = _state(dev, vmsg)
    dev.vq[index].enable = bool(enable)
    return False


def vu_get_inflight_fd(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    """A fresh memfd holding one zeroed ``VuVirtqInflight`` per queue, for the front-end to
    keep and give back (SET_INFLIGHT_FD) to the next backend."""
    if len(vmsg.payload) != INFLIGHT.size:
        raise VuPanic(f"Invalid get_inflight_fd message:{len(vmsg.payload)}")
    _, _, num_queues, queue_size = INFLIGHT.unpack(vmsg.payload)
    if not 0 < queue_size <= VIRTQUEUE_MAX_SIZE or not 0 < num_queues <= dev.max_queues:
        raise VuPanic(f"get_inflight_fd: {num_queues} queues of {queue_size}")
    mmap_size = vu_inflight_queue_size(queue_size) * num_queues
    fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, mmap_size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        mp = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        raise
    _set_inflight_info(dev, fd, mp, mmap_size)
    vmsg.payload = INFLIGHT.pack(mmap_size, 0, num_queues, queue_size)
    vmsg.fds = [fd]
    return True


def _set_inflight_info(dev: VuDev, fd: int, mp: mmap.mmap, size: int) -> None:
    vu_close_inflight(dev)
    dev.inflight_info = VuInflightInfo(fd, mp, size)


def vu_close_inflight(dev: VuDev) -> None:
    for vq in dev.vq:
        if vq.inflight is not None:
            vq.inflight.release()
            vq.inflight = None
    info = dev.inflight_info
    if info.map is not None:
        info.map.close()
    if info.fd >= 0:
        os.close(info.fd)
    dev.inflight_info = VuInflightInfo()


def vu_set_inflight_fd(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    """Map the front-end's inflight area; each queue's ``VuVirtqInflight`` in turn."""
    if len(vmsg.fds) != 1 or len(vmsg.payload) != INFLIGHT.size:
        n = len(vmsg.fds)
        vmsg_close_fds(vmsg)
        raise VuPanic(f"Invalid set_inflight_fd message size:{len(vmsg.payload)} fds:{n}")
    fd = vmsg.fds[0]
    vmsg.fds = []
    mmap_size, mmap_offset, num_queues, queue_size = INFLIGHT.unpack(vmsg.payload)
    per_queue = vu_inflight_queue_size(queue_size)
    if not 0 < queue_size <= VIRTQUEUE_MAX_SIZE or num_queues > dev.max_queues \
            or per_queue * num_queues > mmap_size or mmap_offset % mmap.ALLOCATIONGRANULARITY:
        os.close(fd)
        raise VuPanic(f"set_inflight_fd: {num_queues} queues of {queue_size} "
                      f"in {mmap_size} bytes at {mmap_offset}")
    try:
        mp = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=mmap_offset)
    except (OSError, ValueError, OverflowError) as e:
        os.close(fd)
        raise VuPanic(f"set_inflight_fd mmap error: {e}") from None
    _set_inflight_info(dev, fd, mp, mmap_size)
    for i in range(num_queues):
        dev.vq[i].inflight = VuVirtqInflight(mp, i * per_queue, queue_size)
    return False


def vu_process_message(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    """One request: True when a reply (in ``vmsg``) goes back."""
    handled = dev.iface.process_msg(dev, vmsg)
    if handled is not None:
        return handled
    handler = _HANDLERS.get(vmsg.request)
    if handler is None:
        vmsg_close_fds(vmsg)
        raise VuPanic(f"Unhandled request: {vmsg.request}")
    return handler(dev, vmsg)


def vu_dispatch(dev: VuDev, vmsg: VhostUserMsg) -> bool:
    """Process one received message and send its reply (REPLY_ACK's u64 0 when the
    front-end asked for one and the request has none of its own). False: the device
    panicked, or the reply could not be written."""
    dev.messages += 1
    if trace_vu_dispatch.on:
        trace_vu_dispatch(request=_name(vmsg.request), flags=vmsg.flags, size=len(vmsg.payload),
                          fds=len(vmsg.fds))
    need_reply = vmsg.need_reply
    if vmsg.fds and vmsg.request not in _FD_REQUESTS:
        vmsg_close_fds(vmsg)  # fds no handler takes: a peer could fill the fd table with them
    try:
        reply_requested = vu_process_message(dev, vmsg)
    except VuPanic as e:
        vmsg_close_fds(vmsg)
        vu_panic(dev, str(e))
        return False
    except struct.error as e:
        vmsg_close_fds(vmsg)
        vu_panic(dev, f"{_name(vmsg.request)}: {e}")
        return False
    if dev.broken:
        return False
    if not reply_requested and need_reply:
        vmsg_set_reply_u64(vmsg, 0)
        reply_requested = True
    if not reply_requested:
        return True
    return vu_send_reply(dev, vmsg)


_FD_REQUESTS = frozenset((R.SET_MEM_TABLE, R.SET_LOG_BASE, R.SET_VRING_KICK, R.SET_VRING_CALL,
                          R.SET_VRING_ERR, R.SET_INFLIGHT_FD))
"""The requests whose handlers take (or close) the fds that come with them."""

_HANDLERS: dict[int, Callable[[VuDev, VhostUserMsg], bool]] = {
    R.GET_FEATURES: vu_get_features_exec,
    R.SET_FEATURES: vu_set_features_exec,
    R.GET_PROTOCOL_FEATURES: vu_get_protocol_features_exec,
    R.SET_PROTOCOL_FEATURES: vu_set_protocol_features_exec,
    R.SET_OWNER: vu_set_owner_exec,
    R.RESET_OWNER: vu_reset_device_exec,
    R.SET_MEM_TABLE: vu_set_mem_table_exec,
    R.SET_LOG_BASE: vu_set_log_base_exec,
    R.SET_VRING_NUM: vu_set_vring_num_exec,
    R.SET_VRING_ADDR: vu_set_vring_addr_exec,
    R.SET_VRING_BASE: vu_set_vring_base_exec,
    R.GET_VRING_BASE: vu_get_vring_base_exec,
    R.SET_VRING_KICK: vu_set_vring_kick_exec,
    R.SET_VRING_CALL: vu_set_vring_call_exec,
    R.SET_VRING_ERR: vu_set_vring_err_exec,
    R.GET_QUEUE_NUM: vu_get_queue_num_exec,
    R.SET_VRING_ENABLE: vu_set_vring_enable_exec,
    R.GET_INFLIGHT_FD: vu_get_inflight_fd,
    R.SET_INFLIGHT_FD: vu_set_inflight_fd,
}


def vu_deinit(dev: VuDev) -> None:
    """Unmap everything and close every fd the connection brought."""
    vu_remove_all_mem_regs(dev)
    for vq in dev.vq:
        for attr in ("call_fd", "kick_fd", "err_fd"):
            fd = getattr(vq, attr)
            if fd != -1:
                if attr == "kick_fd":
                    dev.remove_watch(fd)
                os.close(fd)
                setattr(vq, attr, -1)
        vq.resubmit_list = []
    vu_close_inflight(dev)


def vu_queue_enabled(dev: VuDev, vq: VuVirtq) -> bool:
    return vq.enable


def vu_queue_started(dev: VuDev, vq: VuVirtq) -> bool:
    return vq.started


def _eventfd_write(dev: VuDev, fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # the counter is at its maximum: the peer has a signal pending anyway
    except OSError as e:
        vu_panic(dev, f"Error writing eventfd: {e.strerror}")


# -- the split virtqueue ----------------------------------------------------------------------

def virtqueue_num_heads(dev: VuDev, vq: VuVirtq, idx: int) -> int:
    ring = vq.vring
    assert ring is not None
    vq.shadow_avail_idx = ring.avail[1]
    num_heads = (vq.shadow_avail_idx - idx) & 0xFFFF
    if num_heads > ring.num:
        vu_panic(dev, f"Guest moved used index from {idx} to {vq.shadow_avail_idx}")
        return -1
    return num_heads


def virtqueue_get_head(dev: VuDev, vq: VuVirtq, idx: int) -> int:
    ring = vq.vring
    assert ring is not None
    head = ring.avail[2 + idx % ring.num]
    if head >= ring.num:
        vu_panic(dev, f"Guest says index {head} is available")
        return -1
    return head


def virtqueue_read_indirect_desc(dev: VuDev, addr: int, length: int) -> memoryview | None:
    """An indirect table that spans regions, copied out of them."""
    if length > VIRTQUEUE_MAX_SIZE * VRING_DESC_SIZE or length == 0:
        return None
    out = bytearray()
    while len(out) < length:
        part = vu_gpa_to_va(dev, length - len(out), addr + len(out))
        if part is None:
            return None
        out += part
    return memoryview(bytes(out))


def _indirect_table(dev: VuDev, addr: int, length: int) -> memoryview | None:
    if length % VRING_DESC_SIZE or length == 0 or length > VIRTQUEUE_MAX_SIZE * VRING_DESC_SIZE:
        return None
    desc = vu_gpa_to_va(dev, length, addr)
    if desc is not None and len(desc) != length:
        desc = virtqueue_read_indirect_desc(dev, addr, length)
    return desc


_unpack_desc = DESC.unpack_from


def vu_queue_map_desc(dev: VuDev, vq: VuVirtq, idx: int) -> VuVirtqElement | None:
    """Walk the chain at head ``idx`` (into its indirect table if it has one) and map every
    buffer: device-readable ones to ``out_sg``, then device-writable ones to ``in_sg``."""
    ring = vq.vring
    assert ring is not None
    desc = ring.desc
    max_ = ring.num
    i = idx
    addr, length, flags, nxt = _unpack_desc(desc, i << 4)
    if flags & VRING_DESC_F_INDIRECT:
        table = _indirect_table(dev, addr, length)
        if table is None:
            vu_panic(dev, "Invalid indirect buffer table" if length % VRING_DESC_SIZE == 0
                     else "Invalid size for indirect buffer table")
            return None
        desc, max_, i = table, length // VRING_DESC_SIZE, 0
        addr, length, flags, nxt = _unpack_desc(desc, 0)
    out_sg: list[memoryview] = []
    in_sg: list[memoryview] = []
    n = 0
    while True:
        if flags & VRING_DESC_F_INDIRECT and desc is not ring.desc:
            vu_panic(dev, "Nested indirect descriptor")
            return None
        if flags & VRING_DESC_F_WRITE:
            if not virtqueue_map_desc(dev, in_sg, addr, length):
                return None
        else:
            if in_sg:
                vu_panic(dev, "Incorrect order for descriptors")
                return None
            if not virtqueue_map_desc(dev, out_sg, addr, length):
                return None
        n += 1
        if n > max_:
            vu_panic(dev, "Looped descriptor")
            return None
        if not flags & VRING_DESC_F_NEXT:
            break
        if nxt >= max_:
            vu_panic(dev, f"Desc next is {nxt}")
            return None
        addr, length, flags, nxt = _unpack_desc(desc, nxt << 4)
    return VuVirtqElement(idx, out_sg, in_sg)


def _vu_queue_get_avail_bytes(dev: VuDev, vq: VuVirtq, max_in_bytes: int,
                              max_out_bytes: int) -> tuple[int, int]:
    if vq.packed is not None:
        return vu_queue_packed_get_avail_bytes(dev, vq, max_in_bytes, max_out_bytes)
    in_total = out_total = 0
    ring = vq.vring
    if dev.broken or ring is None:
        return 0, 0
    idx = vq.last_avail_idx
    while True:
        rc = virtqueue_num_heads(dev, vq, idx)
        if rc < 0:
            return 0, 0
        if rc == 0:
            return in_total, out_total
        i = virtqueue_get_head(dev, vq, idx)
        idx += 1
        if i < 0:
            return 0, 0
        desc, max_ = ring.desc, ring.num
        addr, length, flags, nxt = _unpack_desc(desc, i << 4)
        if flags & VRING_DESC_F_INDIRECT:
            table = _indirect_table(dev, addr, length)
            if table is None:
                vu_panic(dev, "Invalid indirect buffer table")
                return 0, 0
            desc, max_ = table, length // VRING_DESC_SIZE
            addr, length, flags, nxt = _unpack_desc(desc, 0)
        num_bufs = 0
        while True:
            num_bufs += 1
            if num_bufs > max_:
                vu_panic(dev, "Looped descriptor")
                return 0, 0
            if flags & VRING_DESC_F_WRITE:
                in_total += length
            else:
                out_total += length
            if in_total >= max_in_bytes and out_total >= max_out_bytes:
                return in_total, out_total
            if not flags & VRING_DESC_F_NEXT:
                break
            if nxt >= max_:
                vu_panic(dev, f"Desc next is {nxt}")
                return 0, 0
            addr, length, flags, nxt = _unpack_desc(desc, nxt << 4)


def vu_queue_err(dev: VuDev, vq: VuVirtq) -> None:
    """A fault in this queue's ring broke the device: its error eventfd
    (VHOST_USER_SET_VRING_ERR) tells the front-end which queue, as vhost's vq_err does
    (libvhost-user only panics)."""
    if vq.err_fd != -1:
        _eventfd_write(dev, vq.err_fd)


def vu_queue_pop(dev: VuDev, vq: VuVirtq) -> VuVirtqElement | None:
    """The next available chain, mapped; None when there is none or the device broke."""
    if dev.broken:
        return None
    elem = _vu_queue_pop(dev, vq)
    if elem is None and dev.broken:
        vu_queue_err(dev, vq)
    return elem


def vu_queue_get_avail_bytes(dev: VuDev, vq: VuVirtq, max_in_bytes: int,
                             max_out_bytes: int) -> tuple[int, int]:
    """(in, out) bytes the available chains offer, counted until both maxima are reached;
    (0, 0) after any error in them."""
    if dev.broken:
        return 0, 0
    r = _vu_queue_get_avail_bytes(dev, vq, max_in_bytes, max_out_bytes)
    if dev.broken:
        vu_queue_err(dev, vq)
    return r


def vu_queue_avail_bytes(dev: VuDev, vq: VuVirtq, in_bytes: int, out_bytes: int) -> bool:
    in_total, out_total = vu_queue_get_avail_bytes(dev, vq, in_bytes, out_bytes)
    return in_bytes <= in_total and out_bytes <= out_total


def vu_queue_empty(dev: VuDev, vq: VuVirtq) -> bool:
    if vq.packed is not None:
        return dev.broken or vu_queue_packed_empty(dev, vq)
    ring = vq.vring
    if dev.broken or ring is None:
        return True
    if vq.shadow_avail_idx != vq.last_avail_idx:
        return False
    vq.shadow_avail_idx = ring.avail[1]
    return vq.shadow_avail_idx == vq.last_avail_idx


def vring_notify(dev: VuDev, vq: VuVirtq) -> bool:
    """Whether the driver wants this interrupt: always on an empty queue with
    NOTIFY_ON_EMPTY; else the avail flags, or with EVENT_IDX ``vring_need_event`` on the
    used_event the driver wrote."""
    ring = vq.vring
    assert ring is not None
    if vu_has_feature(dev, VIRTIO_F_NOTIFY_ON_EMPTY) and not vq.inuse \
            and vu_queue_empty(dev, vq):
        return True
    if not dev.features >> VIRTIO_RING_F_EVENT_IDX & 1:
        return not ring.avail[0] & VRING_AVAIL_F_NO_INTERRUPT
    v = vq.signalled_used_valid
    vq.signalled_used_valid = True
    old = vq.signalled_used
    new = vq.signalled_used = vq.used_idx
    return not v or vring_need_event(ring.avail[2 + ring.num], new, old)


def vu_queue_notify(dev: VuDev, vq: VuVirtq) -> None:
    if dev.broken or not vq.ready:
        return
    if vq.packed is not None:
        if not vring_packed_notify(dev, vq):
            return
    elif not vring_notify(dev, vq):
        return
    if vq.call_fd >= 0:
        vq.calls += 1
        if trace_vu_queue_notify.on:
            trace_vu_queue_notify(vq=vq.index, used_idx=vq.used_idx)
        _eventfd_write(dev, vq.call_fd)


def vring_set_avail_event(vq: VuVirtq, val: int) -> None:
    if not vq.notification:
        return
    assert vq.vring is not None
    vq.vring.avail_event_h[0] = val & 0xFFFF


def vu_queue_set_notification(dev: VuDev, vq: VuVirtq, enable: bool) -> None:
    """Ask the driver for kicks (``enable``) or not: the used flags' NO_NOTIFY, or with
    EVENT_IDX the avail_event (left where it is while disabled)."""
    if vq.packed is not None:
        vu_queue_packed_set_notification(dev, vq, enable)
        return
    vq.notification = enable
    ring = vq.vring
    if ring is None:
        return
    if vu_has_feature(dev, VIRTIO_RING_F_EVENT_IDX):
        vring_set_avail_event(vq, ring.avail[1])
    elif enable:
        ring.used_hdr[0] &= ~VRING_USED_F_NO_NOTIFY
    else:
        ring.used_hdr[0] |= VRING_USED_F_NO_NOTIFY


def _vu_queue_pop(dev: VuDev, vq: VuVirtq) -> VuVirtqElement | None:
    if vq.packed is not None:
        elem = vu_queue_packed_pop(dev, vq)
        if trace_vu_queue_pop.on and elem is not None:
            trace_vu_queue_pop(vq=vq.index, head=elem.index, out_num=len(elem.out_sg),
                               in_num=len(elem.in_sg))
        return elem
    ring = vq.vring
    if dev.broken or ring is None:
        return None
    if vq.resubmit_list:
        head, _ = vq.resubmit_list.pop()
        return vu_queue_map_desc(dev, vq, head)
    if vq.shadow_avail_idx == vq.last_avail_idx:
        vq.shadow_avail_idx = ring.avail[1]
        if vq.shadow_avail_idx == vq.last_avail_idx:
            return None
    if vq.inuse >= ring.num:
        vu_panic(dev, "Virtqueue size exceeded")
        return None
    if (vq.shadow_avail_idx - vq.last_avail_idx) & 0xFFFF > ring.num:
        vu_panic(dev, f"Guest moved avail index from {vq.last_avail_idx} to "
                      f"{vq.shadow_avail_idx}")
        return None
    head = virtqueue_get_head(dev, vq, vq.last_avail_idx)
    if head < 0:
        return None
    vq.last_avail_idx = (vq.last_avail_idx + 1) & 0xFFFF
    if dev.features >> VIRTIO_RING_F_EVENT_IDX & 1:
        vring_set_avail_event(vq, vq.last_avail_idx)
    elem = vu_queue_map_desc(dev, vq, head)
    if elem is None:
        return None
    vq.inuse += 1
    if vq.inflight is not None:
        vu_queue_inflight_get(dev, vq, head)
    if trace_vu_queue_pop.on:
        trace_vu_queue_pop(vq=vq.index, head=head, out_num=len(elem.out_sg),
                           in_num=len(elem.in_sg))
    return elem


def vu_queue_detach_element(dev: VuDev, vq: VuVirtq, elem: VuVirtqElement) -> None:
    vq.inuse -= 1


def vu_queue_unpop(dev: VuDev, vq: VuVirtq, elem: VuVirtqElement) -> None:
    vq.last_avail_idx = (vq.last_avail_idx - 1) & 0xFFFF
    vu_queue_detach_element(dev, vq, elem)


def vu_queue_rewind(dev: VuDev, vq: VuVirtq, num: int) -> bool:
    """Give back the last ``num`` popped chains (they are popped again next)."""
    if vq.packed is not None:
        return vu_queue_packed_rewind(dev, vq, num)
    if num > vq.inuse:
        return False
    vq.last_avail_idx = (vq.last_avail_idx - num) & 0xFFFF
    vq.inuse -= num
    return True


def vu_queue_fill(dev: VuDev, vq: VuVirtq, elem: VuVirtqElement, length: int,
                  idx: int) -> None:
    """Write used element ``idx`` past the used index: the chain's head and its length."""
    if vq.packed is not None:
        vu_queue_packed_fill(dev, vq, elem, length, idx)
        return
    ring = vq.vring
    if dev.broken or ring is None:
        return
    i = ((idx + vq.used_idx) % ring.num) << 1
    ring.used_ring[i] = elem.index
    ring.used_ring[i + 1] = length


def vu_queue_flush(dev: VuDev, vq: VuVirtq, count: int) -> None:
    """Publish ``count`` filled used elements (one used->idx store)."""
    if trace_vu_queue_flush.on:
        trace_vu_queue_flush(vq=vq.index, count=count)
    if vq.packed is not None:
        vu_queue_packed_flush(dev, vq, count)
        return
    ring = vq.vring
    if dev.broken or ring is None:
        return
    old = vq.used_idx
    new = (old + count) & 0xFFFF
    ring.used_hdr[1] = new
    vq.used_idx = new
    vq.inuse -= count
    if ((new - vq.signalled_used) & 0xFFFF) < ((new - old) & 0xFFFF):
        vq.signalled_used_valid = False


def vu_queue_push(dev: VuDev, vq: VuVirtq, elem: VuVirtqElement, length: int) -> None:
    vu_queue_fill(dev, vq, elem, length, 0)
    if vq.inflight is not None:
        vu_queue_inflight_pre_put(dev, vq, elem.index)
    vu_queue_flush(dev, vq, 1)
    if vq.inflight is not None:
        vu_queue_inflight_post_put(dev, vq, elem.index)


# -- inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) --------------------------------

def vu_queue_inflight_get(dev: VuDev, vq: VuVirtq, desc_idx: int) -> int:
    if not vu_has_protocol_feature(dev, P.INFLIGHT_SHMFD):
        return 0
    if vq.inflight is None:
        return -1
    vq.inflight.set_desc(desc_idx, 1, vq.counter)
    vq.counter += 1
    return 0


def vu_queue_inflight_pre_put(dev: VuDev, vq: VuVirtq, desc_idx: int) -> int:
    if not vu_has_protocol_feature(dev, P.INFLIGHT_SHMFD):
        return 0
    if vq.inflight is None:
        return -1
    vq.inflight.last_batch_head = desc_idx
    return 0


def vu_queue_inflight_post_put(dev: VuDev, vq: VuVirtq, desc_idx: int) -> int:
    if not vu_has_protocol_feature(dev, P.INFLIGHT_SHMFD):
        return 0
    if vq.inflight is None:
        return -1
    vq.inflight.clear_desc(desc_idx)
    vq.inflight.used_idx = vq.used_idx
    return 0


def vu_check_queue_inflights(dev: VuDev, vq: VuVirtq) -> int:
    """On a queue's start: the chains a previous backend popped and never completed
    become the resubmit list, oldest first (split rings)."""
    if not vu_has_protocol_feature(dev, P.INFLIGHT_SHMFD):
        return 0
    inflight = vq.inflight
    if inflight is None or vq.vring is None:
        return 0 if vq.packed is not None else -1
    if not inflight.version:
        inflight.version = INFLIGHT_VERSION
        return 0
    if inflight.desc_num != vq.num:
        return -1
    vq.used_idx = vq.vring.used_hdr[1]
    vq.resubmit_list = []
    vq.counter = 0
    if inflight.used_idx != vq.used_idx:
        head = inflight.last_batch_head
        if head < inflight.desc_num:
            inflight.clear_desc(head)
        inflight.used_idx = vq.used_idx
    pending = [(i, inflight.counter(i)) for i in range(inflight.desc_num)
               if inflight.inflight(i)]
    vq.inuse = len(pending)
    vq.shadow_avail_idx = vq.last_avail_idx = (vq.inuse + vq.used_idx) & 0xFFFF
    if pending:
        pending.sort(key=lambda p: p[1], reverse=True)  # popped from the end: oldest first
        vq.resubmit_list = pending
        vq.counter = pending[0][1] + 1
    if vq.kick_fd != -1:  # in case of I/O hang after reconnecting
        _eventfd_write(dev, vq.kick_fd)
    return 0
