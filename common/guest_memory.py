"""Guest RAM: one POSIX shared-memory segment; a guest-physical address is an offset in it.

The guest maps it as its own memory. The device side reaches it only through
``address_space_map`` / ``dma_memory_read`` / ``dma_memory_write`` (QEMU's softmmu/physmem.c
and include/sysemu/dma.h), which refuse anything outside the segment.
"""

from __future__ import annotations

import ctypes
import mmap

import posix_ipc


class GuestMemoryError(Exception):
    """A guest-supplied address or length falls outside guest RAM."""


class GuestMemory:
    __slots__ = ("name", "size", "_map", "ram")

    def __init__(self, name: str, size: int = 0, create: bool = False) -> None:
        flags = posix_ipc.O_CREX if create else 0
        shm = posix_ipc.SharedMemory(name, flags, mode=0o600, size=size if create else 0)
        try:
            self._map = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        self.name = name
        self.size = self._map.size()
        self.ram = memoryview(self._map)

    def check(self, addr: int, length: int) -> None:
        if addr < 0 or length < 0 or addr + length > self.size:
            raise GuestMemoryError(
                f"guest address 0x{addr:x}+{length} outside guest RAM (0x{self.size:x} bytes)"
            )

    def address_space_map(self, addr: int, length: int) -> memoryview:
        """A view of guest memory [addr, addr+length), bounds-checked."""
        if addr < 0 or length < 0 or addr + length > self.size:
            self.check(addr, length)
        return self.ram[addr : addr + length]

    def host_addr(self) -> int:
        """This process's virtual address of the mapping (a RAMBlock's ``host``): what a
        vhost-user front-end tells its back end as a region's ``userspace_addr``."""
        probe = ctypes.c_char.from_buffer(self._map)
        addr = ctypes.addressof(probe)
        del probe
        return addr

    def dma_memory_read(self, addr: int, length: int) -> bytes:
        return bytes(self.address_space_map(addr, length))

    def dma_memory_write(self, addr: int, data: bytes | memoryview) -> None:
        self.address_space_map(addr, len(data))[:] = data

    def close(self) -> None:
        try:
            self.ram.release()
            self._map.close()
        except BufferError:  # a view is still exported; the process exit unmaps it
            pass

    @staticmethod
    def unlink(name: str) -> None:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass
