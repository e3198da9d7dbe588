"""The guest's memory management, reduced to what the driver needs: page-aligned allocations
for the vrings (alloc_pages_exact) and a slab of packet buffers for sk_buffs."""

from __future__ import annotations

PAGE_SIZE = 4096
SKB_BUF_SIZE = 2048
SKB_HEADROOM = 64


class OutOfMemory(Exception):
    pass


class PageAllocator:
    """A bump allocator over guest-physical memory, from page 1 up (page 0 stays unused)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.next = PAGE_SIZE

    def alloc(self, nbytes: int, align: int = PAGE_SIZE) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + nbytes > self.size:
            raise OutOfMemory(f"guest RAM exhausted allocating {nbytes} bytes")
        self.next = addr + nbytes
        return addr


CHECKSUM_NONE = 0
CHECKSUM_UNNECESSARY = 1
CHECKSUM_PARTIAL = 3


class SkBuff:
    """struct sk_buff, reduced: a buffer in guest RAM with the frame at [data, data+len)."""

    __slots__ = ("head", "data", "len", "slot", "queue_mapping", "ip_summed", "csum_start",
                 "csum_offset")

    def __init__(self, head: int, slot: int) -> None:
        self.head = head
        self.slot = slot
        self.data = head + SKB_HEADROOM
        self.len = 0
        self.queue_mapping = 0
        self.ip_summed = CHECKSUM_NONE
        self.csum_start = 0  # with CHECKSUM_PARTIAL: where the device starts summing (frame offset)
        self.csum_offset = 0  # ... and where, from there, it stores the checksum


class SkbPool:
    """A fixed slab of sk_buffs: no allocation per packet; empty means the sender must wait."""

    def __init__(self, pages: PageAllocator, count: int) -> None:
        base = pages.alloc(count * SKB_BUF_SIZE)
        self.all = [SkBuff(base + i * SKB_BUF_SIZE, i) for i in range(count)]
        self.free = list(reversed(self.all))

    def alloc_skb(self) -> SkBuff | None:
        if not self.free:
            return None
        skb = self.free.pop()
        skb.data = skb.head + SKB_HEADROOM
        skb.len = 0
        skb.queue_mapping = 0
        skb.ip_summed = CHECKSUM_NONE
        return skb

    def kfree_skb(self, skb: SkBuff) -> None:
        self.free.append(skb)
