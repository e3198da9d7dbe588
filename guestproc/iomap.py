"""Stands for lib/iomap.c: ioread/iowrite on a "cookie" that is either an I/O port or an
MMIO address (IO_COND). Here a port is below 0x10000 (the legacy BAR's ports, as
``pci_iomap`` of an I/O BAR gives them) and anything else is a guest-physical MMIO address:
the first is a trapping IN/OUT, the second a load or store that exits to KVM (EPT)."""

from __future__ import annotations

from guestproc.cpu import VCpu

PIO_LIMIT = 0x10000


def ioread8(cpu: VCpu, addr: int) -> int:
    return cpu.inb(addr) if addr < PIO_LIMIT else cpu.mmio_read(addr, 1) & 0xFF


def ioread16(cpu: VCpu, addr: int) -> int:
    return cpu.inw(addr) if addr < PIO_LIMIT else cpu.mmio_read(addr, 2) & 0xFFFF


def ioread32(cpu: VCpu, addr: int) -> int:
    return cpu.inl(addr) if addr < PIO_LIMIT else cpu.mmio_read(addr, 4) & 0xFFFFFFFF


def iowrite8(cpu: VCpu, val: int, addr: int) -> None:
    if addr < PIO_LIMIT:
        cpu.outb(val, addr)
    else:
        cpu.mmio_write(addr, 1, val & 0xFF)


def iowrite16(cpu: VCpu, val: int, addr: int) -> None:
    if addr < PIO_LIMIT:
        cpu.outw(val, addr)
    else:
        cpu.mmio_write(addr, 2, val & 0xFFFF)


def iowrite32(cpu: VCpu, val: int, addr: int) -> None:
    if addr < PIO_LIMIT:
        cpu.outl(val, addr)
    else:
        cpu.mmio_write(addr, 4, val & 0xFFFFFFFF)
