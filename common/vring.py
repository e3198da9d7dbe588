"""Stands for include/uapi/linux/virtio_ring.h: the split virtqueue's byte layout.

A legacy split ring of ``num`` entries at guest-physical ``base``:

    desc[num]   16 bytes each: addr u64, len u32, flags u16, next u16
    avail       flags u16, idx u16, ring[num] u16, used_event u16
    (pad to align)
    used        flags u16, idx u16, ring[num] {id u32, len u32}, avail_event u16

Everything little-endian; indices are free-running u16.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

if sys.byteorder != "little":  # the typed views below are native-endian casts
    raise ImportError("virtio-net-replica needs a little-endian host")

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

VIRTQUEUE_MAX_SIZE = 32768  # the split ring's limit in the spec (QEMU caps at 1024)
VRING_DESC_SIZE = 16
VRING_USED_ELEM_SIZE = 8

DESC = struct.Struct("<QIHH")
"""struct vring_desc: addr, len, flags, next."""


def vring_size(num: int, align: int) -> int:
    """Bytes a legacy ring of ``num`` entries takes (``vring_size`` in virtio_ring.h)."""
    return ((VRING_DESC_SIZE * num + 2 * (3 + num) + align - 1) & ~(align - 1)) + 2 * 3 + (
        VRING_USED_ELEM_SIZE * num
    )


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """True when moving the index from ``old`` to ``new_idx`` passes ``event_idx`` (EVENT_IDX)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class VringLayout:
    """Where each part of a ring lies, as ``vring_init`` computes it."""

    num: int
    base: int
    align: int = 4096

    @property
    def desc(self) -> int:
        return self.base

    @property
    def avail(self) -> int:
        return self.base + VRING_DESC_SIZE * self.num

    @property
    def used_event(self) -> int:
        return self.avail + 4 + 2 * self.num

    @property
    def used(self) -> int:
        return (self.avail + 2 * (3 + self.num) + self.align - 1) & ~(self.align - 1)

    @property
    def avail_event(self) -> int:
        return self.used + 4 + VRING_USED_ELEM_SIZE * self.num

    @property
    def size(self) -> int:
        return vring_size(self.num, self.align)

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class VringAddrs:
    """A split ring whose three parts lie where the driver put each (virtio 1.0's descriptor
    table, driver area and device area: queue_desc, queue_avail, queue_used); the views take
    it as they take a ``VringLayout``."""

    num: int
    desc: int
    avail: int
    used: int

    @property
    def used_event(self) -> int:
        return self.avail + 4 + 2 * self.num

    @property
    def avail_event(self) -> int:
        return self.used + 4 + VRING_USED_ELEM_SIZE * self.num

    def parts(self) -> tuple[tuple[str, int, int], ...]:
        """(name, address, length) of each part, in the order QEMU maps them."""
        n = self.num
        return (("desc", self.desc, VRING_DESC_SIZE * n),
                ("used", self.used, 6 + VRING_USED_ELEM_SIZE * n),
                ("avail", self.avail, 2 * (3 + n)))


class VringViews:
    """Typed views over one ring in guest RAM, for both sides' hot paths.

    Indices go through ``memoryview.cast('H')`` stores and loads, which are single aligned
    16-bit accesses: a concurrent reader never sees one torn (``struct.pack_into`` can be).
    The caller guarantees ``layout`` lies inside ``ram``.
    """

    __slots__ = ("layout", "num", "desc", "avail", "used_hdr", "used_ring", "avail_event_h")

    def __init__(self, ram: memoryview, layout: VringLayout | VringAddrs) -> None:
        n = layout.num
        self.layout = layout
        self.num = n
        self.desc = ram[layout.desc : layout.desc + VRING_DESC_SIZE * n]
        # avail: [0]=flags [1]=idx [2..2+n)=ring [2+n]=used_event
        self.avail = ram[layout.avail : layout.avail + 2 * (3 + n)].cast("H")
        # used: flags, idx as u16; ring as u32 pairs (id, len); avail_event as u16
        self.used_hdr = ram[layout.used : layout.used + 4].cast("H")
        self.used_ring = ram[layout.used + 4 : layout.used + 4 + VRING_USED_ELEM_SIZE * n].cast("I")
        self.avail_event_h = ram[layout.avail_event : layout.avail_event + 2].cast("H")

    def release(self) -> None:
        for v in (self.desc, self.avail, self.used_hdr, self.used_ring, self.avail_event_h):
            v.release()
