"""A driver-side mock of a split virtqueue, in the style of rust-vmm's ``MockSplitQueue``.

``MockSplitQueue`` writes the descriptor table, the avail ring and the avail index into guest
RAM exactly where and how a driver does (through ``common.vring``'s views), and reads back
what the device wrote to the used ring. Besides the well-formed path (``add_chain``) it
offers raw writes of any field (``write_desc``, ``set_avail_entry``, ``set_avail_idx``, ...)
so that validation and fuzz tests can hand the device rings no real driver would write.

``make_device`` builds the smallest device side for such a ring: a ``VirtIODevice`` with one
``VirtQueue`` placed at the mock's ring, whose DMA is the same ``GuestMemory``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from common.guest_memory import GuestMemory
from common.notifier import EventNotifier
from common.virtio_abi import (
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_RING_PACKED,
    VIRTIO_ID_NET,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from common.vring import (
    DESC,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VringLayout,
    VringViews,
)
from common.vring_packed import (
    AVAIL_F,
    PACKED_DESC,
    USED_F,
    VRING_PACKED_DESC_SIZE,
    PackedLayout,
    PackedViews,
    layout_at,
    vring_packed_size,
)
from qemuproc.virtio import (
    VirtIODevice,
    VirtQueue,
    virtio_add_queue,
    virtio_queue_ready,
    virtio_queue_set_addr,
    virtio_queue_set_rings,
    virtio_set_features,
)

TEST_PREFIX = "vnrtest."
"""Names of the IPC objects tests make (not ``vnr.``: a run's cleanup never touches them)."""

PAGE = 4096


def ipc_name(what: str) -> str:
    """A POSIX IPC name unique to this process and call."""
    return f"/{TEST_PREFIX}{os.getpid()}.{secrets.token_hex(4)}.{what}"


@contextmanager
def guest_memory(size: int = 1 << 20) -> Iterator[GuestMemory]:
    """A fresh guest-RAM segment, unlinked (and unmapped) on exit."""
    name = ipc_name("ram")
    mem = GuestMemory(name, size, create=True)
    try:
        yield mem
    finally:
        mem.close()
        GuestMemory.unlink(name)


@contextmanager
def event_notifier() -> Iterator[EventNotifier]:
    """A fresh named semaphore (an eventfd stand-in), unlinked on exit."""
    name = ipc_name("sem")
    notifier = EventNotifier(name, create=True)
    try:
        yield notifier
    finally:
        notifier.close()
        EventNotifier.unlink(name)


@dataclass(frozen=True)
class RawDesc:
    """One descriptor exactly as it lies in the table (any values, valid or not)."""

    addr: int
    len: int
    flags: int = 0
    next: int = 0


class MockSplitQueue:
    """The driver's half of one split ring in ``mem`` at ``base``.

    Buffers for ``add_chain`` come from a bump allocator over the pages after the ring
    (``data_base`` .. end of RAM); descriptors are handed out in table order, wrapping.
    """

    def __init__(self, mem: GuestMemory, num: int, base: int = PAGE, align: int = PAGE,
                 data_base: int | None = None) -> None:
        self.mem = mem
        self.layout = VringLayout(num, base, align)
        mem.check(base, self.layout.size)
        self.num = num
        self.views = VringViews(mem.ram, self.layout)
        self.data_base = data_base if data_base is not None else (
            (self.layout.end + PAGE - 1) & ~(PAGE - 1))
        self.next_data = self.data_base
        self.next_desc = 0
        self.avail_shadow = 0
        mem.ram[self.layout.base : self.layout.end] = bytes(self.layout.size)

    def release(self) -> None:
        """Drop the views into guest RAM (needed before the segment can be unmapped)."""
        self.views.release()

    # -- raw writes: anything a driver (or an attacker) can store ---------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Store descriptor ``index`` (0 <= index < num) with arbitrary fields."""
        DESC.pack_into(self.views.desc, index * VRING_DESC_SIZE, addr, length, flags, next)

    def write_raw(self, index: int, desc: RawDesc) -> None:
        self.write_desc(index, desc.addr, desc.len, desc.flags, desc.next)

    def set_avail_entry(self, pos: int, head: int) -> None:
        """Store ``head`` (any u16) in avail ring slot ``pos`` (taken modulo num)."""
        self.views.avail[2 + pos % self.num] = head & 0xFFFF

    def set_avail_idx(self, idx: int) -> None:
        """Publish an arbitrary avail index (the store the device reads first)."""
        self.avail_shadow = idx & 0xFFFF
        self.views.avail[1] = self.avail_shadow

    def set_avail_flags(self, flags: int) -> None:
        self.views.avail[0] = flags & 0xFFFF

    def set_used_event(self, idx: int) -> None:
        self.views.avail[2 + self.num] = idx & 0xFFFF

    def write_data(self, addr: int, data: bytes) -> None:
        self.mem.dma_memory_write(addr, data)

    # -- reads -----------------------------------------------------------------------------------

    def read_desc(self, index: int) -> RawDesc:
        return RawDesc(*DESC.unpack_from(self.views.desc, index * VRING_DESC_SIZE))

    @property
    def avail_idx(self) -> int:
        return self.views.avail[1]

    @property
    def avail_flags(self) -> int:
        return self.views.avail[0]

    def avail_entry(self, pos: int) -> int:
        return self.views.avail[2 + pos % self.num]

    @property
    def used_event(self) -> int:
        return self.views.avail[2 + self.num]

    @property
    def used_idx(self) -> int:
        return self.views.used_hdr[1]

    @property
    def used_flags(self) -> int:
        return self.views.used_hdr[0]

    @property
    def avail_event(self) -> int:
        return self.views.avail_event_h[0]

    def used_elem(self, pos: int) -> tuple[int, int]:
        """(id, len) of used ring slot ``pos`` (taken modulo num)."""
        slot = (pos % self.num) * 2
        return self.views.used_ring[slot], self.views.used_ring[slot + 1]

    def read_data(self, addr: int, length: int) -> bytes:
        return self.mem.dma_memory_read(addr, length)

    # -- the well-formed driver path ---------------------------------------------------------------

    def alloc(self, length: int, align: int = 16) -> int:
        """Guest-physical room for a buffer of ``length`` bytes."""
        addr = (self.next_data + align - 1) & ~(align - 1)
        self.mem.check(addr, length)
        self.next_data = addr + length
        return addr

    def build_chain(self, descs: list[RawDesc], first: int | None = None) -> int:
        """Write ``descs`` at consecutive table slots (wrapping) linked with NEXT; returns head.

        Each descriptor keeps its own flags (WRITE, INDIRECT, ...); NEXT and ``next`` are set
        on all but the last, cleared on the last.
        """
        start = self.next_desc if first is None else first
        idx = [(start + k) % self.num for k in range(len(descs))]
        for k, d in enumerate(descs):
            last = k == len(descs) - 1
            flags = d.flags & ~VRING_DESC_F_NEXT if last else d.flags | VRING_DESC_F_NEXT
            self.write_desc(idx[k], d.addr, d.len, flags, 0 if last else idx[k + 1])
        self.next_desc = (start + len(descs)) % self.num
        return start

    def publish(self, head: int) -> int:
        """Put ``head`` in the next avail slot, then move the avail index; returns the slot."""
        pos = self.avail_shadow
        self.set_avail_entry(pos, head)
        self.set_avail_idx(pos + 1)
        return pos

    def add_chain(self, out: list[bytes], in_lens: list[int] | tuple[int, ...] = ()) -> int:
        """A driver's ``virtqueue_add``: device-readable buffers ``out`` then writable ones of
        ``in_lens`` bytes, as one chain published in the avail ring; returns the head."""
        descs = []
        for data in out:
            addr = self.alloc(len(data))
            self.write_data(addr, data)
            descs.append(RawDesc(addr, len(data)))
        for length in in_lens:
            descs.append(RawDesc(self.alloc(length), length, VRING_DESC_F_WRITE))
        head = self.build_chain(descs)
        self.publish(head)
        return head


def make_device(mem: GuestMemory, num: int, base: int = PAGE, *, event_idx: bool = False,
                notify_on_empty: bool = False,
                handle_output: Callable[[VirtIODevice, VirtQueue], None] | None = None,
                align: int = PAGE) -> tuple[VirtIODevice, VirtQueue]:
    """A device with one queue of ``num`` placed at ``base`` (as a legacy QUEUE_PFN write
    does), features negotiated as asked, DMA through ``mem``."""
    vdev = VirtIODevice("virtio-net", VIRTIO_ID_NET, 0, mem)
    vq = virtio_add_queue(vdev, num, handle_output or (lambda d, q: None), "TX(q1)")
    features = (int(event_idx) << VIRTIO_RING_F_EVENT_IDX) | (
        int(notify_on_empty) << VIRTIO_F_NOTIFY_ON_EMPTY)
    vdev.host_features = features
    if virtio_set_features(vdev, features) != 0:
        raise RuntimeError("feature negotiation refused")
    vq.align = align
    virtio_queue_set_addr(vdev, vq.queue_index, base)
    if not virtio_queue_ready(vq):
        raise RuntimeError(f"queue at 0x{base:x} refused: {vdev.errors}")
    return vdev, vq


def device_for(mock: MockSplitQueue, *, event_idx: bool = False,
               notify_on_empty: bool = False) -> tuple[VirtIODevice, VirtQueue]:
    """``make_device`` placed at ``mock``'s ring."""
    return make_device(mock.mem, mock.num, mock.layout.base, event_idx=event_idx,
                       notify_on_empty=notify_on_empty, align=mock.layout.align)


def release_device(vq: VirtQueue) -> None:
    """Drop the device's mapping of the ring (before the segment is unmapped)."""
    if vq.views is not None:
        vq.views.release()
        vq.views = None


def restore_device_indices(vq: VirtQueue, idx: int) -> None:
    """Continue a queue whose avail and used indices both stand at ``idx`` (as after a
    migration); the used index in the ring is stored too."""
    vq.last_avail_idx = vq.shadow_avail_idx = vq.used_idx = vq.signalled_used = idx & 0xFFFF
    assert vq.views is not None
    vq.views.used_hdr[1] = idx & 0xFFFF


class MockPackedQueue:
    """The driver's half of one packed ring in ``mem`` (the three areas one after the other
    from ``base``), written field by field as a driver, or an attacker, would."""

    def __init__(self, mem: GuestMemory, num: int, base: int = PAGE) -> None:
        self.mem = mem
        self.num = num
        self.layout = layout_at(base, num)
        mem.check(base, vring_packed_size(num))
        mem.ram[base : base + vring_packed_size(num)] = bytes(vring_packed_size(num))
        self.views = PackedViews.over(mem.ram, self.layout)
        end = base + vring_packed_size(num)
        self.data_base = (end + PAGE - 1) & ~(PAGE - 1)
        self.next_data = self.data_base
        self.next_avail = 0
        self.wrap = True

    def release(self) -> None:
        self.views.release()

    def alloc(self, length: int, align: int = 16) -> int:
        addr = (self.next_data + align - 1) & ~(align - 1)
        self.mem.check(addr, length)
        self.next_data = addr + length
        return addr

    def avail_flags(self, wrap: bool | None = None) -> int:
        """AVAIL/USED bits that make a descriptor available in ``wrap`` (default: current)."""
        w = self.wrap if wrap is None else wrap
        return AVAIL_F if w else USED_F

    def write_desc(self, index: int, addr: int, length: int, buf_id: int = 0,
                   flags: int = 0) -> None:
        """Store descriptor ``index`` with arbitrary fields, flags included."""
        PACKED_DESC.pack_into(self.views.desc, index * VRING_PACKED_DESC_SIZE,
                              addr & (2**64 - 1), length, buf_id, flags)

    def offer(self, descs: list[tuple[int, int, int]], buf_id: int = 0) -> int:
        """Make a chain of (addr, len, flags) available from next_avail: NEXT on all but the
        last, AVAIL/USED of the wrap each position falls in; the head's flags stored last.
        Returns the head position."""
        head = self.next_avail
        head_flags = 0
        for k, (addr, length, flags) in enumerate(descs):
            f = flags | (VRING_DESC_F_NEXT if k < len(descs) - 1 else 0) | self.avail_flags()
            if k == 0:
                head_flags = f
                self.write_desc(self.next_avail, addr, length, buf_id, 0)
            else:
                self.write_desc(self.next_avail, addr, length, buf_id, f)
            self.next_avail += 1
            if self.next_avail == self.num:
                self.next_avail = 0
                self.wrap = not self.wrap
        self.views.desc_h[head * 8 + 7] = head_flags
        return head

    def used_desc(self, index: int) -> tuple[int, int, int]:
        """(id, len, flags) the device wrote at ring position ``index``."""
        _, length, buf_id, flags = PACKED_DESC.unpack_from(self.views.desc,
                                                           index * VRING_PACKED_DESC_SIZE)
        return buf_id, length, flags

    @property
    def device_event(self) -> tuple[int, int]:
        return self.views.device[0], self.views.device[1]

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.views.driver[0] = off_wrap
        self.views.driver[1] = flags


def make_packed_device(mem: GuestMemory, num: int, layout: PackedLayout, *,
                       event_idx: bool = False, indirect: bool = False,
                       handle_output: Callable[[VirtIODevice, VirtQueue], None] | None = None
                       ) -> tuple[VirtIODevice, VirtQueue]:
    """A device with one queue whose three areas are ``layout``'s (as a modern transport's
    queue_desc/driver/device writes place them), VIRTIO_F_RING_PACKED negotiated."""
    vdev = VirtIODevice("virtio-net", VIRTIO_ID_NET, 0, mem)
    vq = virtio_add_queue(vdev, num, handle_output or (lambda d, q: None), "TX(q1)")
    features = (1 << VIRTIO_F_RING_PACKED) | (int(event_idx) << VIRTIO_RING_F_EVENT_IDX) | (
        int(indirect) << VIRTIO_RING_F_INDIRECT_DESC)
    vdev.host_features = features
    if virtio_set_features(vdev, features) != 0:
        raise RuntimeError("feature negotiation refused")
    virtio_queue_set_rings(vdev, vq.queue_index, layout.desc, layout.driver, layout.device)
    if not virtio_queue_ready(vq):
        raise RuntimeError(f"packed queue refused: {vdev.errors}")
    return vdev, vq


def release_packed_device(vq: VirtQueue) -> None:
    if vq.packed is not None:
        vq.packed.release()
        vq.packed = None
