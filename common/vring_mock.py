"""The driver's side of a virtqueue, mocked in guest RAM, in the style of rust-vmm's
``MockSplitQueue``; the tests and the fuzzer both drive the device through it.

``MockSplitQueue`` writes the descriptor table, the avail ring and the avail index exactly
where and how a driver does (through ``common.vring``'s views) and reads back what the device
wrote to the used ring; ``MockPackedQueue`` does the same for a packed ring (descriptors with
AVAIL/USED bits of the driver's wrap counter, the event structures). Besides the well-formed
path (``add_chain``, ``offer``, ``offer_next``) each offers raw stores of any field, so that
validation tests and the fuzzer can hand the device rings no real driver would write.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.guest_memory import GuestMemory
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
    AVAIL_USED_F,
    PACKED_DESC,
    USED_F,
    VRING_PACKED_DESC_SIZE,
    PackedViews,
    is_used_desc,
    layout_at,
    vring_packed_size,
)

PAGE = 4096


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

    @property
    def base(self) -> int:
        return self.layout.base

    def release(self) -> None:
        """Drop the views into guest RAM (needed before the segment can be unmapped)."""
        self.views.release()

    # -- raw writes: anything a driver (or an attacker) can store ---------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Store descriptor ``index`` (taken modulo num) with arbitrary fields."""
        DESC.pack_into(self.views.desc, (index % self.num) * VRING_DESC_SIZE, addr, length,
                       flags, next)

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

    def u16(self, addr: int, value: int | None = None) -> int:
        """A 16-bit load, after a store of ``value`` if given, anywhere in guest RAM: how a
        hostile driver reaches any field of its ring."""
        ram = self.mem.ram
        if value is not None:
            ram[addr : addr + 2] = (value & 0xFFFF).to_bytes(2, "little")
        return int.from_bytes(ram[addr : addr + 2], "little")

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

    def publish_heads(self, heads: list[int]) -> None:
        """Put ``heads`` in the avail ring from the avail index as guest RAM holds it (a raw
        store may have moved it), then move the index past them."""
        idx = self.avail_idx
        for head in heads:
            self.set_avail_entry(idx, head)
            idx += 1
        self.set_avail_idx(idx)

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
        self.base = base
        self.next_avail = 0
        self.wrap = True
        self.last_used = 0
        self.used_wrap = True
        self.ids = 0

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
        """Store descriptor ``index`` (taken modulo num) with arbitrary fields, flags
        included."""
        PACKED_DESC.pack_into(self.views.desc, (index % self.num) * VRING_PACKED_DESC_SIZE,
                              addr & (2**64 - 1), length & 0xFFFFFFFF, buf_id & 0xFFFF,
                              flags & 0xFFFF)

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) at ring position ``index`` (taken modulo num)."""
        return PACKED_DESC.unpack_from(self.views.desc,
                                       (index % self.num) * VRING_PACKED_DESC_SIZE)

    def set_flags(self, index: int, flags: int) -> None:
        """Store only the flags of position ``index``: the store that hands a head over."""
        self.views.desc_h[(index % self.num) * 8 + 7] = flags & 0xFFFF

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

    def offer_next(self, descs: list[tuple[int, int, int]]) -> tuple[int, int]:
        """A driver's ``virtqueue_add_packed``: a chain of (addr, len, flags) from next_avail
        under the next buffer id, its flags as given (NEXT included) with the AVAIL/USED bits
        of the current wrap, the head's flags stored last; returns (buffer id, positions)."""
        buf_id = self.ids = (self.ids + 1) % self.num
        head, head_flags = self.next_avail, 0
        for addr, length, flags in descs:
            f = (flags & ~AVAIL_USED_F) | self.avail_flags()
            self.write_desc(self.next_avail, addr, length, buf_id,
                            0 if self.next_avail == head else f)
            if self.next_avail == head:
                head_flags = f
            self.next_avail += 1
            if self.next_avail == self.num:
                self.next_avail = 0
                self.wrap = not self.wrap
        self.set_flags(head, head_flags)
        return buf_id, len(descs)

    def take_used(self, ndescs: int) -> tuple[int, int] | None:
        """A driver's ``virtqueue_get_buf_ctx_packed``: (id, len) at last_used if the device
        marked it used in the used wrap, moving on by the ``ndescs`` positions it took."""
        _, length, buf_id, flags = self.read_desc(self.last_used)
        if not is_used_desc(flags, self.used_wrap):
            return None
        self.last_used += ndescs
        if self.last_used >= self.num:
            self.last_used -= self.num
            self.used_wrap = not self.used_wrap
        return buf_id, length

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
