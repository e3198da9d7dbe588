"""Stands for arch/x86/kernel/apic/io_apic.c: the guest's side of the IOAPIC.

A PCI INTx line is an IOAPIC pin (GSI = the config space's interrupt line). Setting it up
writes the pin's redirection-table entry through the IOAPIC's MMIO window (IOREGSEL, then
IOWIN, each a trapping MMIO write that KVM's in-kernel IOAPIC serves): the vector,
level-triggered and active low as PCI lines are, delivered to APIC 0; ``unmask_ioapic_irq``
and ``mask_ioapic_irq`` flip its mask bit.
"""

from __future__ import annotations

from common.kvm_abi import (
    IOAPIC_DEFAULT_BASE_ADDRESS,
    IOAPIC_REDIR_TABLE_BASE,
    IOAPIC_REG_SELECT,
    IOAPIC_REG_WINDOW,
    IOAPIC_RTE_MASKED,
    IOAPIC_RTE_POLARITY,
    IOAPIC_RTE_TRIG_MODE,
)
from guestproc.cpu import VCpu


class IoApic:
    def __init__(self, cpu: VCpu, base: int = IOAPIC_DEFAULT_BASE_ADDRESS) -> None:
        self.cpu = cpu
        self.base = base
        self.entries: dict[int, int] = {}

    def io_apic_write(self, reg: int, value: int) -> None:
        self.cpu.mmio_write(self.base + IOAPIC_REG_SELECT, 4, reg)
        self.cpu.mmio_write(self.base + IOAPIC_REG_WINDOW, 4, value & 0xFFFFFFFF)

    def io_apic_read(self, reg: int) -> int:
        self.cpu.mmio_write(self.base + IOAPIC_REG_SELECT, 4, reg)
        return self.cpu.mmio_read(self.base + IOAPIC_REG_WINDOW, 4)

    def ioapic_write_entry(self, pin: int, entry: int) -> None:
        """Write the high half (destination) first, then the low half (vector, mode, mask)."""
        reg = IOAPIC_REDIR_TABLE_BASE + 2 * pin
        self.io_apic_write(reg + 1, entry >> 32)
        self.io_apic_write(reg, entry)
        self.entries[pin] = entry

    def setup_ioapic_irq(self, pin: int, vector: int) -> None:
        """A PCI line: level-triggered, active low, to APIC 0; masked until started."""
        self.ioapic_write_entry(pin, vector | IOAPIC_RTE_TRIG_MODE | IOAPIC_RTE_POLARITY
                                | IOAPIC_RTE_MASKED)

    def unmask_ioapic_irq(self, pin: int) -> None:
        self.ioapic_write_entry(pin, self.entries[pin] & ~IOAPIC_RTE_MASKED)

    def mask_ioapic_irq(self, pin: int) -> None:
        if pin in self.entries:
            self.ioapic_write_entry(pin, self.entries[pin] | IOAPIC_RTE_MASKED)
