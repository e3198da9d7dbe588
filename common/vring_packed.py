"""Stands for include/uapi/linux/virtio_ring.h, its packed half: the virtio 1.1 packed ring.

A packed ring of ``num`` entries is three separate areas (each its own guest-physical address,
as the modern transport's queue_desc/queue_driver/queue_device registers give them):

    desc[num]   16 bytes each: addr u64, len u32, id u16, flags u16   (struct vring_packed_desc)
    driver      off_wrap u16, flags u16   (struct vring_packed_desc_event, written by the driver)
    device      off_wrap u16, flags u16   (the same struct, written by the device)

A descriptor is available when its AVAIL bit equals the driver's wrap counter and its USED bit
does not; used when both equal the device's wrap counter. Everything little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VRING_PACKED_DESC_F_AVAIL = 7
VRING_PACKED_DESC_F_USED = 15
"""Bit numbers (not masks) of the descriptor flags, as in virtio_ring.h."""

VRING_PACKED_EVENT_FLAG_ENABLE = 0x0
VRING_PACKED_EVENT_FLAG_DISABLE = 0x1
VRING_PACKED_EVENT_FLAG_DESC = 0x2
VRING_PACKED_EVENT_F_WRAP_CTR = 15
"""Bit of off_wrap that carries the wrap counter; the offset is the 15 bits below it."""

AVAIL_F = 1 << VRING_PACKED_DESC_F_AVAIL
USED_F = 1 << VRING_PACKED_DESC_F_USED
AVAIL_USED_F = AVAIL_F | USED_F

VRING_PACKED_DESC_SIZE = 16
VRING_PACKED_EVENT_SIZE = 4

PACKED_DESC = struct.Struct("<QIHH")
"""struct vring_packed_desc: addr, len, id, flags."""
PACKED_DESC_NO_FLAGS = struct.Struct("<QIH")
"""Its addr, len and id: what a driver stores before it hands the head over with the flags."""
PACKED_DESC_EVENT = struct.Struct("<HH")
"""struct vring_packed_desc_event: off_wrap, flags."""

DESC_ID_H = 6
DESC_FLAGS_H = 7
"""u16 positions of id and flags inside one descriptor (8 u16s), for the ``H`` view."""
EVENT_OFF_WRAP_H = 0
EVENT_FLAGS_H = 1


def is_avail_desc(flags: int, wrap_counter: bool) -> bool:
    """QEMU's is_desc_avail: AVAIL differs from USED and equals the driver's wrap counter."""
    avail = bool(flags & AVAIL_F)
    return avail != bool(flags & USED_F) and avail == wrap_counter


def is_used_desc(flags: int, used_wrap_counter: bool) -> bool:
    """Linux's is_used_desc_packed test on one flags word."""
    used = bool(flags & USED_F)
    return bool(flags & AVAIL_F) == used and used == used_wrap_counter


@dataclass(frozen=True)
class PackedLayout:
    """Where the three areas of one packed ring lie (guest-physical)."""

    num: int
    desc: int
    driver: int
    device: int

    @property
    def desc_size(self) -> int:
        return VRING_PACKED_DESC_SIZE * self.num


class PackedViews:
    """Typed views over one packed ring, for both sides' hot paths.

    ``desc`` is the byte view of the descriptor table (for whole-descriptor packs), ``desc_h``
    its u16 cast: ``desc_h[i * 8 + 7]`` is descriptor i's flags, one aligned 16-bit access that
    a concurrent reader never sees torn. ``driver``/``device`` are the event structures as u16
    pairs [off_wrap, flags]. ``desc``/``driver``/``device`` are the three mappings given.
    """

    __slots__ = ("num", "desc", "desc_h", "driver", "device")

    def __init__(self, num: int, desc: memoryview, driver: memoryview, device: memoryview) -> None:
        self.num = num
        self.desc = desc[: VRING_PACKED_DESC_SIZE * num]
        self.desc_h = self.desc.cast("H")
        self.driver = driver[:VRING_PACKED_EVENT_SIZE].cast("H")
        self.device = device[:VRING_PACKED_EVENT_SIZE].cast("H")

    @classmethod
    def over(cls, ram: memoryview, layout: PackedLayout) -> PackedViews:
        """Views of ``layout`` in ``ram`` (the caller guarantees it lies inside)."""
        return cls(layout.num, ram[layout.desc : layout.desc + layout.desc_size],
                   ram[layout.driver : layout.driver + VRING_PACKED_EVENT_SIZE],
                   ram[layout.device : layout.device + VRING_PACKED_EVENT_SIZE])

    def release(self) -> None:
        for v in (self.desc_h, self.desc, self.driver, self.device):
            v.release()


def vring_packed_size(num: int) -> int:
    """Bytes of one contiguous block holding a packed ring's three areas (``layout_at``)."""
    return VRING_PACKED_DESC_SIZE * num + 2 * VRING_PACKED_EVENT_SIZE


def layout_at(base: int, num: int) -> PackedLayout:
    """The three areas of a ring of ``num`` placed one after the other from ``base``."""
    driver = base + VRING_PACKED_DESC_SIZE * num
    return PackedLayout(num, base, driver, driver + VRING_PACKED_EVENT_SIZE)
