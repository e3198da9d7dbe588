"""Stands for hw/virtio/virtio.c: the device side of split and packed virtqueues.

The public calls (``virtqueue_pop``, ``virtqueue_fill``, ``virtqueue_flush``,
``virtio_should_notify``, ``virtio_queue_set_notification``, ``virtio_queue_empty``, ...)
dispatch on VIRTIO_F_RING_PACKED to their ``_split``/``_packed`` halves, as QEMU's do; one
VirtQueue carries the state of both.

Everything read from the rings is guest-controlled. A ring is placed only if it lies wholly
inside guest RAM; each descriptor's buffer is mapped through ``address_space_map`` (bounds-
checked); every inconsistency ends in ``virtio_error``, which marks the device broken and
asks the driver for a reset instead of taking the process down.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from common.guest_memory import GuestMemory, GuestMemoryError
from common.trace import (
    VDEV_ADDR,
    VIRTQUEUE_ELEMENT_SIZE,
    elem_addr,
    trace_event,
    trace_group,
    traced,
    vq_addr,
)
from common.virtio_abi import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
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
    VRING_USED_F_NO_NOTIFY,
    VringAddrs,
    VringLayout,
    VringViews,
    vring_need_event,
)
from common.vring_packed import (
    AVAIL_USED_F,
    DESC_FLAGS_H,
    PACKED_DESC,
    VRING_PACKED_DESC_SIZE,
    VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    VRING_PACKED_EVENT_SIZE,
    PackedViews,
    is_avail_desc,
)

VIRTIO_QUEUE_MAX = 64
VIRTQUEUE_SG_MAX = 1024
"""QEMU's VIRTQUEUE_MAX_SIZE: the iovec arrays one pop collects a chain into."""
_F_RING_PACKED = 1 << VIRTIO_F_RING_PACKED
_packed_desc_unpack_from = PACKED_DESC.unpack_from
VIRTIO_NO_VECTOR = VIRTIO_MSI_NO_VECTOR

_desc_unpack_from = DESC.unpack_from
_DESC_F_CHAIN_OR_WRITE = VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE
"""A head descriptor with none of these is one readable buffer: virtqueue_pop's fast path."""
_F_NOTIFY_ON_EMPTY = 1 << VIRTIO_F_NOTIFY_ON_EMPTY

trace_virtqueue_alloc_element = trace_event("virtqueue_alloc_element")
trace_virtqueue_pop = trace_event("virtqueue_pop")
trace_virtqueue_fill = trace_event("virtqueue_fill")
trace_virtqueue_flush = trace_event("virtqueue_flush")
trace_pop_points = trace_group(trace_virtqueue_alloc_element, trace_virtqueue_pop)
trace_push_points = trace_group(trace_virtqueue_fill, trace_virtqueue_flush, with_spans=True)
trace_virtio_queue_notify = trace_event("virtio_queue_notify")
trace_virtio_notify = trace_event("virtio_notify")
trace_virtio_set_status = trace_event("virtio_set_status")
trace_virtio_error = trace_event("virtio_error")


class VirtQueueElement:
    """A popped chain: its head index and the mapped buffers (memoryviews into guest RAM);
    ``addr`` is the address trace events show for it (QEMU's ``elem %p``)."""

    __slots__ = ("index", "addr", "len", "ndescs", "out_sg", "in_sg", "out_addr", "in_addr",
                 "busy")

    def __init__(self, index: int, addr: int = 0) -> None:
        self.index = index
        self.addr = addr
        self.len = 0
        self.ndescs = 1
        self.out_sg: list[memoryview] = []
        self.in_sg: list[memoryview] = []
        self.out_addr: list[int] = []
        self.in_addr: list[int] = []
        self.busy = False

    @property
    def out_num(self) -> int:
        return len(self.out_sg)

    @property
    def in_num(self) -> int:
        return len(self.in_sg)


class VirtQueue:
    def __init__(self, vdev: VirtIODevice, queue_index: int, num: int,
                 handle_output: Callable[[VirtIODevice, VirtQueue], None], name: str) -> None:
        self.vdev = vdev
        self.queue_index = queue_index
        self.name = name
        self.num = num
        self.num_default = num
        self.align = 4096
        self.desc = 0
        self.avail = 0
        self.used = 0
        self.views: VringViews | None = None
        self.packed: PackedViews | None = None
        """The packed ring's mappings (desc, driver and device areas) when RING_PACKED."""
        self.last_avail_wrap_counter = True
        self.shadow_avail_wrap_counter = True
        self.used_wrap_counter = True
        self.used_elems = [VirtQueueElement(0) for _ in range(num)]
        """virtqueue_packed_fill's staging: index, len and ndescs of each filled element."""
        self.last_avail_idx = 0
        self.shadow_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.notification = True
        self.inuse = 0
        self.vector = VIRTIO_NO_VECTOR
        self.handle_output = handle_output
        self.host_notifier: Any = None
        self.guest_notifier: Any = None  # a vhost back end's call eventfd, read by QEMU (INTx)
        self.host_notifier_enabled = False
        self.addr = vq_addr(queue_index)
        self.elems = [VirtQueueElement(i, elem_addr(queue_index, i)) for i in range(num)]
        # vhost-user inflight tracking: a flag per head popped and not yet used, and the used
        # index the flags agree with (qemuproc/vhost_user_inflight.py maps them to shared memory);
        # packed: the positions each buffer id in flight took, and [1] the used wrap counter
        self.inflight = memoryview(bytearray(num))
        self.inflight_num = memoryview(bytearray(2 * num)).cast("H")
        self.inflight_used = memoryview(bytearray(4)).cast("H")
        self.inflight_used[1] = 1
        self.pops = 0
        self.notifies = 0
        self.kicks = 0
        self.kicks_coalesced = 0
        """ioeventfd signals that one read of the eventfd took together with another."""

    def __repr__(self) -> str:
        return self.name


class VirtIODevice:
    """The device-independent state of a virtio device, and its hooks."""

    def __init__(self, name: str, device_id: int, config_len: int, dma: GuestMemory) -> None:
        self.name = name
        self.device_id = device_id
        self.status = 0
        self.isr = 0
        self.generation = 0  # the config generation (common configuration's config_generation)
        self.queue_sel = 0
        self.guest_features = 0
        self.host_features = 0
        self.config_len = config_len
        self.config_vector = VIRTIO_NO_VECTOR
        self.vq: list[VirtQueue] = []
        self.broken = False
        self.broken_reason = ""
        self.errors: list[str] = []
        self.vm_running = True
        self.started = False
        self.dma = dma
        self.addr = VDEV_ADDR
        self.event_idx = False
        self.notify_vector: Callable[[int], None] = lambda vector: None
        self.on_error: Callable[[str], None] = lambda message: None

    # hooks a device overrides (VirtioDeviceClass)
    def get_features(self, features: int) -> int:
        return features

    def set_features(self, features: int) -> None:
        pass

    def set_status(self, status: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def get_config(self) -> bytes:
        return b""

    def set_config(self, data: bytes) -> None:
        pass


def virtio_add_queue(vdev: VirtIODevice, queue_size: int,
                     handle_output: Callable[[VirtIODevice, VirtQueue], None],
                     name: str) -> VirtQueue:
    if len(vdev.vq) >= VIRTIO_QUEUE_MAX or queue_size > VIRTQUEUE_MAX_SIZE:
        raise ValueError("virtio: too many queues or queue too large")
    vq = VirtQueue(vdev, len(vdev.vq), queue_size, handle_output, name)
    vdev.vq.append(vq)
    return vq


def virtio_vdev_has_feature(vdev: VirtIODevice, bit: int) -> bool:
    return bool(vdev.guest_features & (1 << bit))


VIRTIO_ERRORS_KEPT = 32
"""Messages kept per device: a guest that breaks it, resets it and breaks it again forever
must not grow the list without bound (QEMU only logs them)."""


def error_report(message: str) -> None:
    """util/error-report.c: one line on stderr."""
    print(f"qemu: {message}", file=sys.stderr)


def virtio_error(vdev: VirtIODevice, message: str) -> None:
    """The guest broke the rules: log it, set NEEDS_RESET, tell a live driver with a config
    interrupt, then mark the device broken (it ignores the guest until a reset)."""
    if trace_virtio_error.on:
        trace_virtio_error(message=message)
    error_report(f"{vdev.name}: {message}")
    if len(vdev.errors) < VIRTIO_ERRORS_KEPT:
        vdev.errors.append(message)
    if vdev.broken:
        return
    vdev.broken_reason = message
    vdev.status |= VIRTIO_CONFIG_S_NEEDS_RESET
    virtio_notify_config(vdev)  # only reaches a driver that set DRIVER_OK
    vdev.broken = True
    vdev.on_error(message)


def virtio_queue_set_addr(vdev: VirtIODevice, n: int, addr: int) -> None:
    """Legacy: the driver placed queue ``n`` at ``addr`` (from QUEUE_PFN); 0 removes it."""
    vq = vdev.vq[n]
    vq.desc = addr
    virtio_queue_update_rings(vdev, n)


def virtio_queue_update_rings(vdev: VirtIODevice, n: int) -> None:
    """Legacy: the avail and used rings follow the descriptor table where vring_init puts
    them (``align`` apart); then map them."""
    vq = vdev.vq[n]
    if vq.desc:
        layout = VringLayout(vq.num, vq.desc, vq.align)
        vq.avail = layout.avail
        vq.used = layout.used
    virtio_init_region_cache(vdev, n)


def virtio_queue_set_rings(vdev: VirtIODevice, n: int, desc: int, avail: int,
                           used: int) -> None:
    """virtio 1.0: the driver gave each part's address (queue_desc/avail/used); map them."""
    vq = vdev.vq[n]
    if not vq.num:
        return
    vq.desc = desc
    vq.avail = avail
    vq.used = used
    virtio_init_region_cache(vdev, n)


def virtio_queue_set_num(vdev: VirtIODevice, n: int, num: int) -> None:
    """The driver's queue_size: a queue cannot be made to exist or vanish, nor grow beyond
    what the device gave it (QEMU's bound is VIRTQUEUE_MAX_SIZE; the replica's elements are
    allocated for the device's size)."""
    vq = vdev.vq[n]
    if bool(num) != bool(vq.num) or num > vq.num_default or num < 0:
        return
    vq.num = num


def virtio_virtqueue_reset_region_cache(vq: VirtQueue) -> None:
    for views in (vq.views, vq.packed):
        if views is not None:
            views.release()
    vq.views = None
    vq.packed = None


def virtio_init_region_cache(vdev: VirtIODevice, n: int) -> None:
    """Map queue ``n``'s three parts (split: descriptor table, avail and used rings; packed:
    the descriptor ring and the driver's and device's event structures): each must lie in
    guest RAM, else virtio_error with QEMU's message; the views go through the bounds-checked
    accessor."""
    vq = vdev.vq[n]
    virtio_virtqueue_reset_region_cache(vq)
    if not vq.desc:
        vq.avail = vq.used = 0
        return
    dma = vdev.dma
    packed = vdev.guest_features & _F_RING_PACKED
    addrs = VringAddrs(vq.num, vq.desc, vq.avail, vq.used)
    parts = (("desc", vq.desc, VRING_PACKED_DESC_SIZE * vq.num),
             ("used", vq.used, VRING_PACKED_EVENT_SIZE),
             ("avail", vq.avail, VRING_PACKED_EVENT_SIZE)) if packed else addrs.parts()
    for what, start, length in parts:
        try:
            dma.check(start, length)
        except GuestMemoryError:
            virtio_error(vdev, f"Cannot map {what}")
            vq.desc = vq.avail = vq.used = 0
            return
    if packed:
        amap = dma.address_space_map
        vq.packed = PackedViews(vq.num, amap(vq.desc, VRING_PACKED_DESC_SIZE * vq.num),
                                amap(vq.avail, VRING_PACKED_EVENT_SIZE),
                                amap(vq.used, VRING_PACKED_EVENT_SIZE))
        return
    lo = min(start for _, start, _ in parts)
    hi = max(start + length for _, start, length in parts)
    ring = dma.address_space_map(lo, hi - lo)  # the span the three parts lie in
    vq.views = VringViews(ring, VringAddrs(vq.num, vq.desc - lo, vq.avail - lo, vq.used - lo))


def virtio_queue_get_last_avail_idx(vq: VirtQueue) -> int:
    """The ring position a vhost back end starts from (VHOST_SET_VRING_BASE's num): split, the
    avail index; packed, avail index and wrap counter in bits 0-15, the used ones above."""
    if vq.packed is None:
        return vq.last_avail_idx
    avail = vq.last_avail_idx | int(vq.last_avail_wrap_counter) << 15
    used = vq.used_idx | int(vq.used_wrap_counter) << 15
    return avail | used << 16


def virtio_queue_set_last_avail_idx(vq: VirtQueue, idx: int) -> None:
    """Where a vhost back end stopped (VHOST_GET_VRING_BASE's num)."""
    if vq.packed is not None:
        vq.last_avail_idx = vq.shadow_avail_idx = idx & 0x7FFF
        vq.last_avail_wrap_counter = vq.shadow_avail_wrap_counter = bool(idx & 0x8000)
        idx >>= 16
        vq.used_idx = idx & 0x7FFF
        vq.used_wrap_counter = bool(idx & 0x8000)
    else:
        vq.last_avail_idx = vq.shadow_avail_idx = idx & 0xFFFF


def virtio_queue_restore_last_avail_idx(vq: VirtQueue) -> None:
    """The back end is gone without saying where it got to: what the guest sees as used is
    all that was done (split: the used ring's index; packed: the used position)."""
    if vq.packed is not None:
        vq.last_avail_idx = vq.shadow_avail_idx = vq.used_idx
        vq.last_avail_wrap_counter = vq.shadow_avail_wrap_counter = vq.used_wrap_counter
    elif vq.views is not None:
        vq.last_avail_idx = vq.shadow_avail_idx = vq.views.used_hdr[1]


def virtio_queue_ready(vq: VirtQueue) -> bool:
    return vq.views is not None or vq.packed is not None


def vring_avail_idx(vq: VirtQueue) -> int:
    vq.shadow_avail_idx = vq.views.avail[1]  # type: ignore[union-attr]
    return vq.shadow_avail_idx


def virtio_queue_empty(vq: VirtQueue) -> bool:
    if vq.vdev.guest_features & _F_RING_PACKED:
        return virtio_queue_packed_empty(vq)
    return virtio_queue_split_empty(vq)


def virtio_queue_split_empty(vq: VirtQueue) -> bool:
    if vq.views is None or vq.vdev.broken:
        return True
    if vq.shadow_avail_idx != vq.last_avail_idx:
        return False
    return vring_avail_idx(vq) == vq.last_avail_idx


def vring_set_avail_event(vq: VirtQueue, val: int) -> None:
    """Tell the driver which avail index to kick at; silent while notifications are off."""
    if not vq.notification:
        return
    vq.views.avail_event_h[0] = val  # type: ignore[union-attr]


def virtio_queue_set_notification(vq: VirtQueue, enable: bool) -> None:
    vq.notification = enable
    if vq.vdev.guest_features & _F_RING_PACKED:
        virtio_queue_packed_set_notification(vq, enable)
    else:
        virtio_queue_split_set_notification(vq, enable)


def virtio_queue_split_set_notification(vq: VirtQueue, enable: bool) -> None:
    v = vq.views
    if v is None:
        return
    if vq.vdev.event_idx:
        vring_set_avail_event(vq, vring_avail_idx(vq))
    elif enable:
        v.used_hdr[0] &= ~VRING_USED_F_NO_NOTIFY
    else:
        v.used_hdr[0] |= VRING_USED_F_NO_NOTIFY
    # smp_mb when enabling: the flag is visible before the caller re-reads the avail index


def virtqueue_num_heads(vq: VirtQueue, idx: int) -> int:
    """Chains the guest offers from ``idx`` on; -1 (and virtio_error) if it claims more than
    the ring holds."""
    num_heads = (vring_avail_idx(vq) - idx) & 0xFFFF
    if num_heads > vq.num:
        virtio_error(vq.vdev, f"Guest moved used index from {idx} to {vq.shadow_avail_idx}")
        return -1
    return num_heads


def virtqueue_get_head(vq: VirtQueue, idx: int) -> int:
    """The head the guest put in avail slot ``idx``; -1 (and virtio_error) if out of range."""
    head = vq.views.avail[2 + idx % vq.num]  # type: ignore[union-attr]
    if head >= vq.num:
        virtio_error(vq.vdev, f"Guest says index {head} is available")
        return -1
    return head


def virtqueue_map_desc(vdev: VirtIODevice, iov: list[memoryview], addrs: list[int],
                       max_num_sg: int, pa: int, sz: int) -> bool:
    """One descriptor's buffer mapped onto ``iov`` (guest RAM is one region, so one entry);
    False after ``virtio_error`` with QEMU's message."""
    if not sz:
        virtio_error(vdev, "virtio: zero sized buffers are not allowed")
        return False
    if len(iov) >= max_num_sg:
        virtio_error(vdev, "virtio: too many write descriptors in indirect table")
        return False
    try:
        iov.append(vdev.dma.address_space_map(pa, sz))
    except GuestMemoryError:
        virtio_error(vdev, "virtio: bogus descriptor or out of resources")
        return False
    addrs.append(pa)
    return True


def map_indirect_table(vdev: VirtIODevice, vq: VirtQueue, addr: int,
                         length: int) -> memoryview | None:
    """Map the indirect table a head descriptor names, or virtio_error and None."""
    if not virtio_vdev_has_feature(vdev, VIRTIO_RING_F_INDIRECT_DESC):
        virtio_error(vdev, "Indirect descriptors not negotiated")
        return None
    if not length or length % VRING_DESC_SIZE:
        virtio_error(vdev, "Invalid size for indirect buffer table")
        return None
    if length // VRING_DESC_SIZE > vq.num:  # a chain is never longer than the queue
        virtio_error(vdev, f"Indirect buffer length too big: {length}")
        return None
    try:
        return vdev.dma.address_space_map(addr, length)
    except GuestMemoryError:
        virtio_error(vdev, "Cannot map indirect buffer")
        return None


def virtqueue_get_avail_bytes(vq: VirtQueue, max_in_bytes: int,
                              max_out_bytes: int) -> tuple[int, int]:
    """Writable and readable bytes the available chains offer, counting no further than the
    two limits; (0, 0) if the guest's rings are inconsistent (reported by virtio_error)."""
    if vq.vdev.guest_features & _F_RING_PACKED:
        return virtqueue_packed_get_avail_bytes(vq, max_in_bytes, max_out_bytes)
    return virtqueue_split_get_avail_bytes(vq, max_in_bytes, max_out_bytes)


def virtqueue_split_get_avail_bytes(vq: VirtQueue, max_in_bytes: int,
                                    max_out_bytes: int) -> tuple[int, int]:
    vdev = vq.vdev
    v = vq.views
    if v is None or vdev.broken:
        return 0, 0
    num = vq.num
    idx = vq.last_avail_idx
    in_total = out_total = total_bufs = 0
    while True:
        heads = virtqueue_num_heads(vq, idx)
        if heads <= 0:
            return (0, 0) if heads < 0 else (in_total, out_total)
        i = virtqueue_get_head(vq, idx)
        if i < 0:
            return 0, 0
        idx = (idx + 1) & 0xFFFF
        desc = v.desc
        max_ = num
        num_bufs = total_bufs
        addr, length, flags, nxt = DESC.unpack_from(desc, i << 4)
        indirect = bool(flags & VRING_DESC_F_INDIRECT)
        if indirect:
            if length % VRING_PACKED_DESC_SIZE:
                virtio_error(vdev, "Invalid size for indirect buffer table")
                return 0, 0
            if num_bufs >= max_:
                virtio_error(vdev, "Looped descriptor")
                return 0, 0
            table = map_indirect_table(vdev, vq, addr, length)
            if table is None:
                return 0, 0
            desc = table
            max_ = length // VRING_DESC_SIZE
            num_bufs = i = 0
            addr, length, flags, nxt = DESC.unpack_from(desc, 0)
        while True:
            num_bufs += 1
            if num_bufs > max_:
                virtio_error(vdev, "Looped descriptor")
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
                virtio_error(vdev, f"Desc next is {nxt}")
                return 0, 0
            addr, length, flags, nxt = DESC.unpack_from(desc, nxt << 4)
        total_bufs = total_bufs + 1 if indirect else num_bufs


def virtqueue_avail_bytes(vq: VirtQueue, in_bytes: int, out_bytes: int) -> bool:
    in_total, out_total = virtqueue_get_avail_bytes(vq, in_bytes, out_bytes)
    return in_bytes <= in_total and out_bytes <= out_total


@traced
def virtqueue_pop(vq: VirtQueue) -> VirtQueueElement | None:
    """Take the next available chain, validated and mapped; None if empty or on error."""
    if vq.vdev.guest_features & _F_RING_PACKED:
        return virtqueue_packed_pop(vq)
    return virtqueue_split_pop(vq)


def virtqueue_split_pop(vq: VirtQueue) -> VirtQueueElement | None:
    """Every check of QEMU's virtqueue_split_pop (and vhost's nested-table check) ends in
    virtio_error; every buffer is mapped by ``address_space_map``, which refuses anything
    outside guest RAM (also an addr + len past 2**64). QEMU's virtqueue_split_pop is this long
    too.
    """
    vdev = vq.vdev
    if vdev.broken:
        return None
    v = vq.views
    if v is None:
        return None
    num = vq.num
    last = vq.last_avail_idx
    shadow = vq.shadow_avail_idx
    if shadow == last:
        shadow = vq.shadow_avail_idx = v.avail[1]
        if shadow == last:
            return None
    # checked on every pop: set_notification also refreshes the shadow index
    if ((shadow - last) & 0xFFFF) > num:  # virtqueue_num_heads
        virtio_error(vdev, f"Guest moved used index from {last} to {shadow}")
        return None
    # smp_rmb: ring entries are read after the index that published them
    if vq.inuse >= num:
        virtio_error(vdev, "Virtqueue size exceeded")
        return None
    head = v.avail[2 + last % num]
    last = (last + 1) & 0xFFFF
    vq.last_avail_idx = last
    if head >= num:
        virtio_error(vdev, f"Guest says index {head} is available")
        return None
    if vdev.event_idx and vq.notification:
        v.avail_event_h[0] = last  # vring_set_avail_event, inlined on the hot path
    elem = vq.elems[head]
    if elem.busy:  # the guest offered a head that is still in flight: give it its own element
        elem = VirtQueueElement(head, elem_addr(vq.queue_index, head, spare=True))
    addr, length, flags, nxt = _desc_unpack_from(v.desc, head << 4)
    if not flags & _DESC_F_CHAIN_OR_WRITE:
        # one readable buffer, the common TX chain: the loop's checks below, for one entry
        if not length:
            virtio_error(vdev, "virtio: zero sized buffers are not allowed")
            return None
        try:
            sg = vdev.dma.address_space_map(addr, length)
        except GuestMemoryError:
            virtio_error(vdev, "virtio: bogus descriptor or out of resources")
            return None
        elem.out_sg = [sg]
        elem.out_addr = [addr]
        if elem.in_sg:
            elem.in_sg = []
            elem.in_addr = []
    else:
        desc = v.desc
        out_sg = elem.out_sg = []
        in_sg = elem.in_sg = []
        out_addr = elem.out_addr = []
        in_addr = elem.in_addr = []
        max_ = num
        indirect = flags & VRING_DESC_F_INDIRECT
        if indirect:
            table = map_indirect_table(vdev, vq, addr, length)
            if table is None:
                return None
            desc = table
            max_ = length // VRING_DESC_SIZE
            addr, length, flags, nxt = _desc_unpack_from(desc, 0)
        entries = 0
        while True:
            if indirect and flags & VRING_DESC_F_INDIRECT:
                virtio_error(vdev, f"Nested indirect descriptor: idx {entries}, {addr:x}")
                return None
            if flags & VRING_DESC_F_WRITE:
                if not virtqueue_map_desc(vdev, in_sg, in_addr, VIRTQUEUE_SG_MAX - len(out_sg),
                                          addr, length):
                    return None
            else:
                if in_sg:
                    virtio_error(vdev, "Incorrect order for descriptors")
                    return None
                if not virtqueue_map_desc(vdev, out_sg, out_addr, VIRTQUEUE_SG_MAX, addr, length):
                    return None
            entries += 1
            if entries > max_:  # more than the table holds: the guest made a loop
                virtio_error(vdev, "Looped descriptor")
                return None
            if not flags & VRING_DESC_F_NEXT:
                break
            if nxt >= max_:
                virtio_error(vdev, f"Desc next is {nxt}")
                return None
            addr, length, flags, nxt = _desc_unpack_from(desc, nxt << 4)
    elem.busy = True
    vq.inflight[head] = 1  # vu_queue_inflight_get
    vq.inuse += 1
    vq.pops += 1
    if trace_pop_points.on:
        if trace_virtqueue_alloc_element.on:
            trace_virtqueue_alloc_element(elem=elem.addr, sz=VIRTQUEUE_ELEMENT_SIZE,
                                          in_num=len(elem.in_sg), out_num=len(elem.out_sg))
        if trace_virtqueue_pop.on:
            trace_virtqueue_pop(vq=vq.addr, elem=elem.addr, in_num=len(elem.in_sg),
                                out_num=len(elem.out_sg))
    return elem


def virtqueue_detach_element(vq: VirtQueue, elem: VirtQueueElement, length: int) -> None:
    vq.inuse -= elem.ndescs
    elem.busy = False
    if elem.index < vq.num:
        vq.inflight[elem.index] = 0
        vq.inflight_num[elem.index] = 0


def virtqueue_split_rewind(vq: VirtQueue, num: int) -> None:
    vq.last_avail_idx = (vq.last_avail_idx - num) & 0xFFFF


def virtqueue_unpop(vq: VirtQueue, elem: VirtQueueElement, length: int) -> None:
    if vq.vdev.guest_features & _F_RING_PACKED:
        virtqueue_packed_rewind(vq, 1)
    else:
        virtqueue_split_rewind(vq, 1)
    virtqueue_detach_element(vq, elem, length)


def virtqueue_rewind(vq: VirtQueue, num: int) -> bool:
    if num > vq.inuse:
        return False
    vq.inuse -= num
    if vq.vdev.guest_features & _F_RING_PACKED:
        virtqueue_packed_rewind(vq, num)
    else:
        virtqueue_split_rewind(vq, num)
    return True


@traced
def virtqueue_fill(vq: VirtQueue, elem: VirtQueueElement, length: int, idx: int) -> None:
    """Record ``elem`` as used with ``length`` bytes written, at position ``idx`` of the
    coming flush (split: the used-ring entry; packed: the staged element)."""
    if trace_virtqueue_fill.on:
        trace_virtqueue_fill(vq=vq.addr, elem=elem.addr, len=length, idx=idx)
    elem.busy = False
    if vq.vdev.broken:
        return
    if vq.vdev.guest_features & _F_RING_PACKED:
        virtqueue_packed_fill(vq, elem, length, idx)
    else:
        virtqueue_split_fill(vq, elem, length, idx)


def virtqueue_split_fill(vq: VirtQueue, elem: VirtQueueElement, length: int, idx: int) -> None:
    v = vq.views
    if v is None:
        return
    slot = ((vq.used_idx + idx) % vq.num) << 1
    v.used_ring[slot] = elem.index
    v.used_ring[slot + 1] = length


def virtqueue_inflight_put_used(vq: VirtQueue, start: int, count: int) -> None:
    """The heads of the ``count`` used entries from ``start`` are no longer in flight. The ids
    are read back from the used ring, which the guest can overwrite: one out of range is
    skipped."""
    used_ring = vq.views.used_ring  # type: ignore[union-attr]
    inflight = vq.inflight
    num = vq.num
    for i in range(start, start + count):
        head = used_ring[(i % num) << 1]
        if head < num:
            inflight[head] = 0


@traced
def virtqueue_flush(vq: VirtQueue, count: int) -> None:
    """Publish ``count`` filled entries (split: by moving the used index)."""
    if vq.vdev.broken:
        vq.inuse -= count
        return
    if vq.vdev.guest_features & _F_RING_PACKED:
        virtqueue_packed_flush(vq, count)
    else:
        virtqueue_split_flush(vq, count)


def virtqueue_split_flush(vq: VirtQueue, count: int) -> None:
    v = vq.views
    if v is None:
        vq.inuse -= count
        return
    # smp_wmb: the entries are visible before the index
    if trace_virtqueue_flush.on:
        trace_virtqueue_flush(vq=vq.addr, count=count)
    old = vq.used_idx
    new = (old + count) & 0xFFFF
    v.used_hdr[1] = new
    # vu_queue_inflight_post_put: after the index, so a crash between leaves both readable
    if count == 1:  # virtqueue_inflight_put_used for one entry, inlined
        num = vq.num
        head = v.used_ring[(old % num) << 1]
        if head < num:
            vq.inflight[head] = 0
    else:
        virtqueue_inflight_put_used(vq, old, count)
    vq.inflight_used[0] = new
    vq.used_idx = new
    vq.inuse -= count
    if ((new - vq.signalled_used + 0x8000) & 0xFFFF) - 0x8000 < ((new - old) & 0xFFFF):
        vq.signalled_used_valid = False


def virtqueue_push(vq: VirtQueue, elem: VirtQueueElement, length: int) -> None:
    """virtqueue_fill then virtqueue_flush of one element.

    Done here in one step, with the same stores and inflight bookkeeping, while their trace
    points and spans are off; else by the two calls, which record them."""
    if trace_push_points.on:
        virtqueue_fill(vq, elem, length, 0)
        virtqueue_flush(vq, 1)
        return
    if vq.vdev.guest_features & _F_RING_PACKED:
        packed_fill_and_flush(vq, elem, length)
        return
    elem.busy = False
    v = vq.views
    if vq.vdev.broken or v is None:
        vq.inuse -= 1
        return
    head = elem.index
    num = vq.num
    old = vq.used_idx
    slot = (old % num) << 1
    used_ring = v.used_ring
    used_ring[slot] = head
    used_ring[slot + 1] = length
    # smp_wmb: the entry is visible before the index
    new = (old + 1) & 0xFFFF
    v.used_hdr[1] = new
    head = used_ring[slot]  # read back, as virtqueue_flush does: the guest may have changed it
    if head < num:
        vq.inflight[head] = 0
    vq.inflight_used[0] = new
    vq.used_idx = new
    vq.inuse -= 1
    if ((new - vq.signalled_used + 0x8000) & 0xFFFF) - 0x8000 < 1:
        vq.signalled_used_valid = False


# -- the packed ring (virtio 1.1) ------------------------------------------------------------


def vring_packed_desc_read(vdev: VirtIODevice, desc: memoryview,
                           i: int) -> tuple[int, int, int, int]:
    """Descriptor ``i`` of ``desc`` as (addr, len, id, flags); an empty table (an indirect
    one of zero length) reads as zeros. The flags are read first (smp_rmb), then the rest."""
    if (i + 1) * VRING_PACKED_DESC_SIZE > len(desc):
        return 0, 0, 0, 0
    return _packed_desc_unpack_from(desc, i << 4)


def virtqueue_packed_read_next_desc(vq: VirtQueue, desc: memoryview, flags: int, max_: int,
                                    i: int, indirect: bool) -> int:
    """The next descriptor of the chain after ``i``, or -1 at its end. In the ring a chain
    goes on while NEXT is set, wrapping past the last entry; in an indirect table it is the
    whole table."""
    if not indirect and not flags & VRING_DESC_F_NEXT:
        return -1
    i += 1
    if i == max_:
        if indirect:
            return -1
        i -= vq.num
    return i


def virtio_queue_packed_empty(vq: VirtQueue) -> bool:
    p = vq.packed
    if p is None or vq.vdev.broken:
        return True
    return not is_avail_desc(p.desc_h[(vq.last_avail_idx << 3) + DESC_FLAGS_H],
                             vq.last_avail_wrap_counter)


def virtio_queue_packed_set_notification(vq: VirtQueue, enable: bool) -> None:
    """The device event structure: DISABLE, or ENABLE, or (EVENT_IDX) DESC with the offset
    and wrap counter the driver should kick at; off_wrap is stored before the flags."""
    p = vq.packed
    if p is None:
        return
    if not enable:
        flags = VRING_PACKED_EVENT_FLAG_DISABLE
    elif vq.vdev.event_idx:
        p.device[0] = vq.shadow_avail_idx | (
            vq.shadow_avail_wrap_counter << VRING_PACKED_EVENT_F_WRAP_CTR)
        flags = VRING_PACKED_EVENT_FLAG_DESC
    else:
        flags = VRING_PACKED_EVENT_FLAG_ENABLE
    p.device[1] = flags
    # smp_mb when enabling: the flags are visible before the caller looks at the ring again


def map_packed_indirect_table(vdev: VirtIODevice, addr: int, length: int) -> memoryview | None:
    if length % VRING_PACKED_DESC_SIZE:
        virtio_error(vdev, "Invalid size for indirect buffer table")
        return None
    try:
        return vdev.dma.address_space_map(addr, length)
    except GuestMemoryError:
        virtio_error(vdev, "Cannot map indirect buffer")
        return None


def virtqueue_packed_pop(vq: VirtQueue) -> VirtQueueElement | None:
    """Take the chain at last_avail_idx if its head is available in the current wrap.

    The chain's descriptors follow the head in the ring (NEXT), or fill the indirect table
    the head names; the buffer id is the head's. Every check ends in virtio_error; every
    buffer is mapped by ``address_space_map``. The ring positions taken (``ndescs``: 1 for an
    indirect chain) move last_avail_idx, flipping its wrap counter past the end."""
    vdev = vq.vdev
    p = vq.packed
    if p is None or virtio_queue_packed_empty(vq):
        return None
    num = vq.num
    if vq.inuse >= num:
        virtio_error(vdev, "Virtqueue size exceeded")
        return None
    i = vq.last_avail_idx
    addr, length, buf_id, flags = _packed_desc_unpack_from(p.desc, i << 4)
    if not flags & _DESC_F_CHAIN_OR_WRITE:
        # one readable buffer, the common TX chain: the loop's checks below, for one entry
        if not length:
            virtio_error(vdev, "virtio: zero sized buffers are not allowed")
            return None
        try:
            out_sg = [vdev.dma.address_space_map(addr, length)]
        except GuestMemoryError:
            virtio_error(vdev, "virtio: bogus descriptor or out of resources")
            return None
        out_addr = [addr]
        in_sg: list[memoryview] = []
        in_addr: list[int] = []
        ndescs = 1
    else:
        desc = p.desc
        max_ = num
        indirect = bool(flags & VRING_DESC_F_INDIRECT)
        if indirect:
            table = map_packed_indirect_table(vdev, addr, length)
            if table is None:
                return None
            desc = table
            max_ = length // VRING_PACKED_DESC_SIZE
            i = 0
            addr, length, _, flags = vring_packed_desc_read(vdev, desc, 0)
        out_sg = []
        in_sg = []
        out_addr = []
        in_addr = []
        entries = 0
        while True:
            if flags & VRING_DESC_F_WRITE:
                if not virtqueue_map_desc(vdev, in_sg, in_addr, VIRTQUEUE_SG_MAX - len(out_sg),
                                          addr, length):
                    return None
            else:
                if in_sg:
                    virtio_error(vdev, "Incorrect order for descriptors")
                    return None
                if not virtqueue_map_desc(vdev, out_sg, out_addr, VIRTQUEUE_SG_MAX, addr,
                                          length):
                    return None
            entries += 1
            if entries > max_:
                virtio_error(vdev, "Looped descriptor")
                return None
            i = virtqueue_packed_read_next_desc(vq, desc, flags, max_, i, indirect)
            if i < 0:
                break
            addr, length, _, flags = vring_packed_desc_read(vdev, desc, i)
        ndescs = 1 if indirect else entries
    elem = vq.elems[buf_id] if buf_id < num else None
    if elem is None or elem.busy:  # an id out of range or still in flight: its own element
        elem = VirtQueueElement(buf_id, elem_addr(vq.queue_index, buf_id % num, spare=True))
    elem.out_sg, elem.in_sg, elem.out_addr, elem.in_addr = out_sg, in_sg, out_addr, in_addr
    elem.ndescs = ndescs
    elem.busy = True
    if buf_id < num:
        vq.inflight_num[buf_id] = ndescs  # vu_queue_inflight_get
    last = vq.last_avail_idx + ndescs
    vq.inuse += ndescs
    if last >= num:
        last -= num
        vq.last_avail_wrap_counter = not vq.last_avail_wrap_counter
    vq.last_avail_idx = vq.shadow_avail_idx = last
    vq.shadow_avail_wrap_counter = vq.last_avail_wrap_counter
    vq.pops += 1
    if trace_pop_points.on:
        trace_packed_pop(vq, elem)
    return elem


def trace_packed_pop(vq: VirtQueue, elem: VirtQueueElement) -> None:
    if trace_virtqueue_alloc_element.on:
        trace_virtqueue_alloc_element(elem=elem.addr, sz=VIRTQUEUE_ELEMENT_SIZE,
                                      in_num=len(elem.in_sg), out_num=len(elem.out_sg))
    if trace_virtqueue_pop.on:
        trace_virtqueue_pop(vq=vq.addr, elem=elem.addr, in_num=len(elem.in_sg),
                            out_num=len(elem.out_sg))


def virtqueue_packed_get_avail_bytes(vq: VirtQueue, max_in_bytes: int,
                                     max_out_bytes: int) -> tuple[int, int]:
    """Walk the available chains from last_avail_idx as virtqueue_packed_pop would, summing
    their buffers; the position reached is kept in shadow_avail_idx/_wrap_counter."""
    vdev = vq.vdev
    p = vq.packed
    if p is None or vdev.broken:
        return 0, 0
    num = vq.num
    idx = vq.last_avail_idx
    wrap_counter = vq.last_avail_wrap_counter
    in_total = out_total = total_bufs = 0
    while True:
        num_bufs = total_bufs
        i = idx
        desc = p.desc
        max_ = num
        addr, length, _, flags = vring_packed_desc_read(vdev, desc, idx)
        if not is_avail_desc(flags, wrap_counter):
            break
        indirect = bool(flags & VRING_DESC_F_INDIRECT)
        if indirect:
            if length % VRING_PACKED_DESC_SIZE:
                virtio_error(vdev, "Invalid size for indirect buffer table")
                return 0, 0
            if num_bufs >= max_:
                virtio_error(vdev, "Looped descriptor")
                return 0, 0
            table = map_packed_indirect_table(vdev, addr, length)
            if table is None:
                return 0, 0
            desc = table
            max_ = length // VRING_PACKED_DESC_SIZE
            num_bufs = i = 0
            addr, length, _, flags = vring_packed_desc_read(vdev, desc, 0)
        while True:
            num_bufs += 1
            if num_bufs > max_:
                virtio_error(vdev, "Looped descriptor")
                return 0, 0
            if flags & VRING_DESC_F_WRITE:
                in_total += length
            else:
                out_total += length
            if in_total >= max_in_bytes and out_total >= max_out_bytes:
                return in_total, out_total
            i = virtqueue_packed_read_next_desc(vq, desc, flags, max_, i, indirect)
            if i < 0:
                break
            addr, length, _, flags = vring_packed_desc_read(vdev, desc, i)
        if indirect:
            total_bufs += 1
            idx += 1
        else:
            idx += num_bufs - total_bufs
            total_bufs = num_bufs
        if idx >= num:
            idx -= num
            wrap_counter = not wrap_counter
    vq.shadow_avail_idx = idx
    vq.shadow_avail_wrap_counter = wrap_counter
    return in_total, out_total


def virtqueue_packed_rewind(vq: VirtQueue, num: int) -> None:
    if vq.last_avail_idx < num:
        vq.last_avail_idx = vq.num + vq.last_avail_idx - num
        vq.last_avail_wrap_counter = not vq.last_avail_wrap_counter
    else:
        vq.last_avail_idx -= num


def virtqueue_packed_fill(vq: VirtQueue, elem: VirtQueueElement, length: int, idx: int) -> None:
    ue = vq.used_elems[idx]
    ue.index = elem.index
    ue.len = length
    ue.ndescs = elem.ndescs


def virtqueue_packed_fill_desc(vq: VirtQueue, elem: VirtQueueElement, idx: int,
                               strict_order: bool) -> None:
    """Write one used descriptor at used_idx + ``idx``: id and len, then (after smp_wmb when
    ``strict_order``) the flags with AVAIL and USED both equal to the used wrap counter."""
    p = vq.packed
    if p is None:
        return
    head = vq.used_idx + idx
    wrap_counter = vq.used_wrap_counter
    if head >= vq.num:
        head -= vq.num
        wrap_counter = not wrap_counter
    h = p.desc_h
    base = head << 3
    h[base + 6] = elem.index & 0xFFFF
    h[base + 4] = elem.len & 0xFFFF
    h[base + 5] = (elem.len >> 16) & 0xFFFF
    # smp_wmb (strict_order): id and len are visible before the flags that hand them over
    h[base + DESC_FLAGS_H] = AVAIL_USED_F if wrap_counter else 0


def packed_fill_and_flush(vq: VirtQueue, elem: VirtQueueElement, length: int) -> None:
    """virtqueue_packed_fill and virtqueue_packed_flush of one element in one step (the same
    stores: id and len, then the flags), while their trace points and spans are off."""
    elem.busy = False
    if vq.vdev.broken:
        vq.inuse -= 1  # virtqueue_flush's count on a broken device, as 7.2
        return
    p = vq.packed
    if p is None:
        return
    head = vq.used_idx
    h = p.desc_h
    base = head << 3
    h[base + 6] = elem.index & 0xFFFF
    h[base + 4] = length & 0xFFFF
    h[base + 5] = (length >> 16) & 0xFFFF
    # smp_wmb: id and len are visible before the flags that hand them over
    wrap = vq.used_wrap_counter
    h[base + DESC_FLAGS_H] = AVAIL_USED_F if wrap else 0
    ndescs = elem.ndescs
    vq.inuse -= ndescs
    head += ndescs
    if head >= vq.num:
        head -= vq.num
        wrap = vq.used_wrap_counter = not wrap
        vq.signalled_used_valid = False
    vq.used_idx = head
    # vu_queue_inflight_post_put: after the flags, so a crash between leaves both readable
    if elem.index < vq.num:
        vq.inflight_num[elem.index] = 0
    vq.inflight_used[0] = head
    vq.inflight_used[1] = wrap


def virtqueue_packed_flush(vq: VirtQueue, count: int) -> None:
    """Hand ``count`` staged elements back: every descriptor but the first's first, the
    first one's flags last, so the driver sees the batch whole (7.2 places element i at
    used_idx + i)."""
    if vq.packed is None:
        return
    ndescs = 0
    used = vq.used_elems
    for i in range(1, count):
        virtqueue_packed_fill_desc(vq, used[i], i, False)
        ndescs += used[i].ndescs
    virtqueue_packed_fill_desc(vq, used[0], 0, True)
    ndescs += used[0].ndescs
    vq.inuse -= ndescs
    vq.used_idx += ndescs
    if vq.used_idx >= vq.num:
        vq.used_idx -= vq.num
        vq.used_wrap_counter = not vq.used_wrap_counter
        vq.signalled_used_valid = False
    for i in range(count):  # vu_queue_inflight_post_put
        if used[i].index < vq.num:
            vq.inflight_num[used[i].index] = 0
    vq.inflight_used[0] = vq.used_idx
    vq.inflight_used[1] = vq.used_wrap_counter


def vring_packed_need_event(vq: VirtQueue, wrap: bool, off_wrap: int, new: int,
                            old: int) -> bool:
    """The driver's event offset, moved back a ring's length if it names the other wrap,
    then the split ring's vring_need_event."""
    off = off_wrap & ~(1 << VRING_PACKED_EVENT_F_WRAP_CTR)
    if wrap != bool(off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR):
        off -= vq.num
    return vring_need_event(off, new, old)


def virtio_packed_should_notify(vdev: VirtIODevice, vq: VirtQueue) -> bool:
    p = vq.packed
    if p is None:
        return False
    flags = p.driver[1]
    # smp_rmb: the flags are read before off_wrap
    off_wrap = p.driver[0]
    old = vq.signalled_used
    new = vq.signalled_used = vq.used_idx
    was_valid = vq.signalled_used_valid
    vq.signalled_used_valid = True
    if flags == VRING_PACKED_EVENT_FLAG_DISABLE:
        return False
    if flags == VRING_PACKED_EVENT_FLAG_ENABLE:
        return True
    return not was_valid or vring_packed_need_event(vq, vq.used_wrap_counter, off_wrap, new, old)


def virtqueue_packed_drop_all(vq: VirtQueue) -> int:
    """Hand every available chain back unused (length 0), without mapping anything."""
    p = vq.packed
    if p is None:
        return 0
    virtio_queue_set_notification(vq, False)
    dropped = 0
    elem = VirtQueueElement(0)
    while vq.inuse < vq.num:
        idx = vq.last_avail_idx
        _, _, buf_id, flags = vring_packed_desc_read(vq.vdev, p.desc, idx)
        if not is_avail_desc(flags, vq.last_avail_wrap_counter):
            break
        elem.index = buf_id
        elem.ndescs = 1
        while (idx := virtqueue_packed_read_next_desc(vq, p.desc, flags, vq.num, idx,
                                                      False)) >= 0:
            elem.ndescs += 1
            if elem.ndescs > vq.num:  # a ring of NEXT flags: QEMU would loop here forever
                break
            flags = vring_packed_desc_read(vq.vdev, p.desc, idx)[3]
        vq.inuse += elem.ndescs  # 7.2 omits it, and its unsigned inuse wraps at the push
        virtqueue_push(vq, elem, 0)
        dropped += 1
        vq.last_avail_idx += elem.ndescs
        if vq.last_avail_idx >= vq.num:
            vq.last_avail_idx -= vq.num
            vq.last_avail_wrap_counter = not vq.last_avail_wrap_counter
    return dropped


def virtqueue_split_drop_all(vq: VirtQueue) -> int:
    dropped = 0
    elem = VirtQueueElement(0)
    while not virtio_queue_empty(vq) and vq.inuse < vq.num:
        head = virtqueue_get_head(vq, vq.last_avail_idx)
        if head < 0:
            break
        elem.index = head
        vq.inuse += 1
        vq.last_avail_idx = (vq.last_avail_idx + 1) & 0xFFFF
        if vq.vdev.event_idx:
            vring_set_avail_event(vq, vq.last_avail_idx)
        virtqueue_push(vq, elem, 0)
        dropped += 1
    return dropped


def virtqueue_drop_all(vq: VirtQueue) -> int:
    """Return every queued buffer to the guest as done, unprocessed."""
    if vq.vdev.broken:
        return 0
    if vq.vdev.guest_features & _F_RING_PACKED:
        return virtqueue_packed_drop_all(vq)
    return virtqueue_split_drop_all(vq)


def virtio_should_notify(vdev: VirtIODevice, vq: VirtQueue) -> bool:
    if vdev.guest_features & _F_RING_PACKED:
        return virtio_packed_should_notify(vdev, vq)
    return virtio_split_should_notify(vdev, vq)


def virtio_split_should_notify(vdev: VirtIODevice, vq: VirtQueue) -> bool:
    # smp_mb: used entries are visible before the driver's event index is read
    v = vq.views
    if v is None:
        return False
    if vdev.guest_features & _F_NOTIFY_ON_EMPTY and not vq.inuse and virtio_queue_empty(vq):
        return True
    if not vdev.event_idx:
        return not (v.avail[0] & VRING_AVAIL_F_NO_INTERRUPT)
    was_valid = vq.signalled_used_valid
    vq.signalled_used_valid = True
    old = vq.signalled_used
    new = vq.signalled_used = vq.used_idx
    return not was_valid or vring_need_event(v.avail[2 + vq.num], new, old)  # used_event


def virtio_notify_vector(vdev: VirtIODevice, vector: int) -> None:
    if vdev.broken:
        return
    vdev.notify_vector(vector)


@traced
def virtio_irq(vq: VirtQueue) -> None:
    vq.vdev.isr |= 0x1
    vq.notifies += 1
    virtio_notify_vector(vq.vdev, vq.vector)


@traced
def virtio_notify(vdev: VirtIODevice, vq: VirtQueue) -> None:
    """Interrupt the driver about used buffers, unless it asked not to be."""
    if not virtio_should_notify(vdev, vq):
        return
    if trace_virtio_notify.on:
        trace_virtio_notify(vdev=vdev.addr, vq=vq.addr)
    virtio_irq(vq)


def virtio_notify_config(vdev: VirtIODevice) -> None:
    """The configuration changed: a new generation, and the config interrupt."""
    if not vdev.status & VIRTIO_CONFIG_S_DRIVER_OK:
        return
    vdev.isr |= 0x3
    vdev.generation += 1
    virtio_notify_vector(vdev, vdev.config_vector)


@traced
def virtio_queue_notify(vdev: VirtIODevice, n: int) -> None:
    """A kick that reached QEMU as a port write (no ioeventfd for this queue)."""
    if n >= len(vdev.vq):
        return
    vq = vdev.vq[n]
    if (vq.views is None and vq.packed is None) or vdev.broken:
        return
    if trace_virtio_queue_notify.on:
        trace_virtio_queue_notify(vdev=vdev.addr, n=n, vq=vq.addr)
    vq.kicks += 1
    if vq.host_notifier_enabled and vq.host_notifier is not None:
        vq.host_notifier.set()
    else:
        vq.handle_output(vdev, vq)


@traced
def virtio_queue_notify_vq(vq: VirtQueue) -> None:
    vdev = vq.vdev
    if (vq.views is None and vq.packed is None) or vdev.broken:
        return
    if trace_virtio_queue_notify.on:
        trace_virtio_queue_notify(vdev=vdev.addr, n=vq.queue_index, vq=vq.addr)
    vq.kicks += 1
    vq.handle_output(vdev, vq)


@traced
def virtio_queue_host_notifier_read(vq: VirtQueue) -> None:
    """The ioeventfd of ``vq`` fired: the main loop runs the queue's handler."""
    n = vq.host_notifier.test_and_clear() if vq.host_notifier is not None else 0
    if n:
        vq.kicks_coalesced += n - 1
        virtio_queue_notify_vq(vq)


def virtio_queue_guest_notifier_read(vq: VirtQueue) -> None:
    """The back end signalled the queue's guest notifier (no irqfd: INTx): interrupt the
    guest as QEMU's own device does, ISR bit and line."""
    if vq.guest_notifier is not None and vq.guest_notifier.test_and_clear():
        virtio_irq(vq)


def virtio_set_features(vdev: VirtIODevice, val: int) -> int:
    """Refused once feature negotiation finished (FEATURES_OK): -EINVAL."""
    if vdev.status & VIRTIO_CONFIG_S_FEATURES_OK:
        return -22
    bad = val & ~vdev.host_features
    vdev.guest_features = val & vdev.host_features
    vdev.event_idx = virtio_vdev_has_feature(vdev, VIRTIO_RING_F_EVENT_IDX)
    vdev.set_features(vdev.guest_features)
    return -1 if bad else 0


def virtio_validate_features(vdev: VirtIODevice) -> int:
    """A device that offers VIRTIO_F_IOMMU_PLATFORM (ACCESS_PLATFORM) cannot work with a
    driver that did not accept it; virtio-net has no validate_features of its own."""
    if vdev.host_features & (1 << VIRTIO_F_ACCESS_PLATFORM) and \
            not virtio_vdev_has_feature(vdev, VIRTIO_F_ACCESS_PLATFORM):
        return -14  # -EFAULT
    return 0


@traced
def virtio_set_status(vdev: VirtIODevice, val: int) -> int:
    """The driver's status write. With VIRTIO_F_VERSION_1, FEATURES_OK is set only if the
    features validate: otherwise the status stays as it was, and the driver, reading it
    back, sees FEATURES_OK clear (the device refused its features)."""
    if trace_virtio_set_status.on:
        trace_virtio_set_status(vdev=vdev.addr, val=val)
    if virtio_vdev_has_feature(vdev, VIRTIO_F_VERSION_1) and \
            not vdev.status & VIRTIO_CONFIG_S_FEATURES_OK and val & VIRTIO_CONFIG_S_FEATURES_OK:
        ret = virtio_validate_features(vdev)
        if ret:
            return ret
    if (vdev.status & VIRTIO_CONFIG_S_DRIVER_OK) != (val & VIRTIO_CONFIG_S_DRIVER_OK):
        vdev.started = bool(val & VIRTIO_CONFIG_S_DRIVER_OK)
    vdev.set_status(val)
    vdev.status = val
    return 0


@traced
def virtio_reset(vdev: VirtIODevice) -> None:
    """Device reset (status 0): forget the rings and features; a broken device works again."""
    virtio_set_status(vdev, 0)
    vdev.reset()
    vdev.started = False
    vdev.broken = False
    vdev.broken_reason = ""
    vdev.guest_features = 0
    vdev.event_idx = False
    vdev.isr = 0
    vdev.queue_sel = 0
    vdev.config_vector = VIRTIO_NO_VECTOR
    for vq in vdev.vq:
        virtio_virtqueue_reset_region_cache(vq)
        vq.desc = vq.avail = vq.used = 0
        vq.last_avail_idx = vq.shadow_avail_idx = vq.used_idx = 0
        vq.last_avail_wrap_counter = vq.shadow_avail_wrap_counter = True
        vq.used_wrap_counter = True
        vq.signalled_used = 0
        vq.signalled_used_valid = False
        vq.notification = True
        vq.inuse = 0
        vq.vector = VIRTIO_NO_VECTOR
        vq.num = vq.num_default
        vq.inflight[:] = bytes(len(vq.inflight))
        vq.inflight_num[:] = memoryview(bytes(2 * len(vq.inflight_num))).cast("H")
        vq.inflight_used[0] = 0
        vq.inflight_used[1] = 1
        for e in vq.elems:
            e.busy = False
            e.ndescs = 1
