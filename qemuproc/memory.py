"""Stands for softmmu/memory.c and physmem.c: memory regions, address spaces, and the
listener that turns a region's eventfds into KVM ioeventfds.

``address_space_io`` holds the port-I/O regions (the PCI host's config ports, the virtio
legacy BAR); ``address_space_memory`` holds guest RAM and MMIO regions (the MSI-X table).
Guest RAM itself is reached through ``common.guest_memory.GuestMemory`` (the one
bounds-checked door), never by raw offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.trace import traced

ReadFn = Callable[[Any, int, int], int]
WriteFn = Callable[[Any, int, int, int], None]


@dataclass
class MemoryRegionOps:
    read: ReadFn
    write: WriteFn


@dataclass
class MemoryRegionIoeventfd:
    addr: int
    size: int
    match_data: bool
    data: int
    notifier: str


@dataclass
class MemoryRegion:
    name: str
    size: int
    ops: MemoryRegionOps | None = None
    opaque: Any = None
    ioeventfds: list[MemoryRegionIoeventfd] = field(default_factory=list)
    container: AddressSpace | None = None
    base: int = 0


class MemoryListener:
    """eventfd_add / eventfd_del, called when a region's ioeventfds change (KVM's listener)."""

    def eventfd_add(self, as_: AddressSpace, mr: MemoryRegion, e: MemoryRegionIoeventfd) -> None:
        raise NotImplementedError

    def eventfd_del(self, as_: AddressSpace, mr: MemoryRegion, e: MemoryRegionIoeventfd) -> None:
        raise NotImplementedError


class AddressSpace:
    def __init__(self, name: str, is_io: bool) -> None:
        self.name = name
        self.is_io = is_io
        self.regions: list[MemoryRegion] = []
        self.listeners: list[MemoryListener] = []
        self.unassigned_accesses = 0

    def add_subregion(self, base: int, mr: MemoryRegion) -> None:
        mr.base = base
        mr.container = self
        self.regions.append(mr)

    def find(self, addr: int) -> MemoryRegion | None:
        for mr in self.regions:
            if mr.base <= addr < mr.base + mr.size:
                return mr
        return None


def memory_region_add_eventfd(mr: MemoryRegion, addr: int, size: int, match_data: bool,
                              data: int, notifier: str) -> None:
    e = MemoryRegionIoeventfd(addr, size, match_data, data, notifier)
    mr.ioeventfds.append(e)
    if mr.container is not None:
        for listener in mr.container.listeners:  # memory_region_transaction_commit
            listener.eventfd_add(mr.container, mr, e)


def memory_region_del_eventfd(mr: MemoryRegion, addr: int, size: int, match_data: bool,
                              data: int, notifier: str) -> None:
    for e in list(mr.ioeventfds):
        if (e.addr, e.size, e.match_data, e.data) == (addr, size, match_data, data):
            mr.ioeventfds.remove(e)
            if mr.container is not None:
                for listener in mr.container.listeners:
                    listener.eventfd_del(mr.container, mr, e)


@traced
def address_space_rw(as_: AddressSpace, addr: int, val: int, size: int, is_write: bool) -> int:
    """Dispatch one access to the region that covers ``addr``; unassigned reads give ~0."""
    mr = as_.find(addr)
    if mr is None or mr.ops is None:
        as_.unassigned_accesses += 1
        return (1 << (8 * size)) - 1 if not is_write else 0
    if is_write:
        mr.ops.write(mr.opaque, addr - mr.base, val, size)
        return 0
    return mr.ops.read(mr.opaque, addr - mr.base, size)
