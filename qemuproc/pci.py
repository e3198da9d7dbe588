"""Stands for hw/pci/pci.c, pci_host.c, msix.c and msi.c: the i440FX-style config ports, a
function's 256-byte configuration space, its INTx pin, and its MSI-X table.

An MSI-X message (``msix_notify`` -> ``msi_send_message``) is a write of the entry's data to
its address on the bus master address space; that address is the local APIC's MSI window,
whose write handler (``kvm_send_msi`` in hw/i386/kvm/apic.c) is ``msi_send``: with an
in-kernel irqchip, KVM_SIGNAL_MSI. The INTx pin (``pci_set_irq``) reaches, through the host
bridge's routing, the GSI of the configuration space's interrupt line: ``intx_set_irq``, with
an in-kernel irqchip KVM_IRQ_LINE_STATUS (kvm_pc_gsi_handler).

BAR addresses are fixed here, as the firmware would have assigned them before the guest
kernel probes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.virtio_abi import (
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_DATA,
    PCI_MSIX_ENTRY_LOWER_ADDR,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_UPPER_ADDR,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
)
from qemuproc.memory import AddressSpace, MemoryRegion, MemoryRegionOps

PCI_CONFIG_SPACE_SIZE = 256
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_CAPABILITY_LIST = 0x34
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_INTERRUPT = 0x08
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_STATUS_CAP_LIST = 0x10
PCI_CONFIG_HEADER_SIZE = 0x40
MSIX_CAP_LENGTH = 12
MSIX_PBA_OFFSET = 0x800
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08


def _le(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class PCIDevice:
    def __init__(self, name: str, devfn: int, vendor: int, device: int, class_code: int,
                 subsys_vendor: int, subsys: int, irq_line: int) -> None:
        self.name = name
        self.devfn = devfn
        self.config = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.wmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        c = self.config
        c[0:2] = _le(vendor, 2)
        c[2:4] = _le(device, 2)
        c[8] = 0  # revision
        c[9:12] = _le(class_code, 3)
        c[0x2C:0x2E] = _le(subsys_vendor, 2)
        c[0x2E:0x30] = _le(subsys, 2)
        c[PCI_INTERRUPT_LINE] = irq_line
        c[PCI_INTERRUPT_PIN] = 1
        self.wmask[PCI_COMMAND] = 0x07
        self.wmask[PCI_COMMAND + 1] = PCI_COMMAND_INTX_DISABLE >> 8
        self.used = bytearray(PCI_CONFIG_SPACE_SIZE)  # config bytes a capability occupies
        self.bars: dict[int, tuple[int, int, int]] = {}  # BAR -> (address, size, type bits)
        self.msix_cap = 0
        self.msix_entries_nr = 0
        self.msix_table = bytearray()
        self.msix_pba = bytearray()
        self.msix_entry_used: list[int] = []
        self.msix_vector_use_notifier: Callable[[int, tuple[int, int]], None] | None = None
        self.msix_vector_release_notifier: Callable[[int], None] | None = None
        self.msix_enable_changed: Callable[[bool], None] = lambda on: None
        self.msi_send: Callable[[int, int], Any] = lambda address, data: None
        self.intx_set_irq: Callable[[int, int], Any] = lambda gsi, level: None
        self.irq_level = 0
        self.msis_sent = 0
        self.msis_masked = 0

    def set_bar(self, n: int, addr: int, is_io: bool, size: int = 0, type_bits: int = 0) -> None:
        """pci_register_bar, with the address the firmware gave it; a 64-bit memory BAR
        (PCI_BASE_ADDRESS_MEM_TYPE_64) takes BAR n+1 for the upper half. The address bits
        are writable (wmask), so that the driver can size the BAR; the regions stay where
        the firmware put them (a BAR written elsewhere is not remapped)."""
        bits = PCI_BASE_ADDRESS_SPACE_IO if is_io else type_bits
        self.bars[n] = (addr, size, bits)
        self.config[0x10 + 4 * n : 0x14 + 4 * n] = _le((addr & 0xFFFFFFFF) | bits, 4)
        wmask = ~(size - 1) if size else 0
        self.wmask[0x10 + 4 * n : 0x14 + 4 * n] = _le(wmask, 4)
        if bits & PCI_BASE_ADDRESS_MEM_TYPE_64:
            self.config[0x14 + 4 * n : 0x18 + 4 * n] = _le(addr >> 32, 4)
            self.wmask[0x14 + 4 * n : 0x18 + 4 * n] = _le(wmask >> 32, 4)

    def pci_add_capability(self, cap_id: int, size: int) -> int:
        """Place a capability in the first free bytes after the header and link it at the
        head of the list, as pci_add_capability (with offset 0: pci_find_space) does."""
        need = (size + 3) & ~3
        offset = PCI_CONFIG_HEADER_SIZE
        while any(self.used[offset : offset + need]):
            offset += 4
            if offset + need > PCI_CONFIG_SPACE_SIZE:
                raise ValueError("PCI config space full")
        c = self.config
        c[offset] = cap_id
        c[offset + 1] = c[PCI_CAPABILITY_LIST]
        c[PCI_CAPABILITY_LIST] = offset
        c[PCI_STATUS] |= PCI_STATUS_CAP_LIST
        self.used[offset : offset + need] = b"\xff" * need
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability, in list order."""
        out: list[tuple[int, int]] = []
        pos = self.config[PCI_CAPABILITY_LIST]
        while pos and len(out) < 48:
            out.append((pos, self.config[pos]))
            pos = self.config[pos + 1]
        return out

    # -- config space -------------------------------------------------------------------------

    def pci_default_read_config(self, addr: int, size: int) -> int:
        return int.from_bytes(self.config[addr : addr + size], "little")

    def pci_default_write_config(self, addr: int, val: int, size: int) -> None:
        was_enabled = self.msix_enabled()
        was_masked = [self.msix_is_masked(v) for v in range(self.msix_entries_nr)]
        was_intx_disabled = self.pci_irq_disabled()
        for i in range(size):
            a = addr + i
            if a >= PCI_CONFIG_SPACE_SIZE:
                break
            m = self.wmask[a]
            b = (val >> (8 * i)) & 0xFF
            self.config[a] = (self.config[a] & ~m) | (b & m)
        if was_intx_disabled != self.pci_irq_disabled():
            self.pci_update_irq_disabled(was_intx_disabled)
        if was_enabled != self.msix_enabled():
            self.msix_enable_changed(self.msix_enabled())
        if self.msix_entries_nr and addr <= self.msix_cap + 3 < addr + size \
                and self.msix_enabled():  # msix_write_config: the control byte
            for vector, masked in enumerate(was_masked):
                self.msix_handle_mask_update(vector, masked)

    # -- MSI-X ----------------------------------------------------------------------------------

    def msix_init(self, nentries: int, bar: int) -> None:
        self.msix_entries_nr = nentries
        self.msix_table = bytearray(nentries * PCI_MSIX_ENTRY_SIZE)
        for v in range(nentries):
            self.msix_table[v * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL] = PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.msix_pba = bytearray((nentries + 7) // 8)
        self.msix_entry_used = [0] * nentries
        self.msix_cap = cap = self.pci_add_capability(PCI_CAP_ID_MSIX, MSIX_CAP_LENGTH)
        c = self.config
        c[cap + 2 : cap + 4] = _le(nentries - 1, 2)
        c[cap + 4 : cap + 8] = _le(0 | bar, 4)
        c[cap + 8 : cap + 12] = _le(MSIX_PBA_OFFSET | bar, 4)
        self.wmask[cap + 3] = (PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL) >> 8

    def msix_enabled(self) -> bool:
        if not self.msix_entries_nr:
            return False
        flags = int.from_bytes(self.config[self.msix_cap + 2 : self.msix_cap + 4], "little")
        return bool(flags & PCI_MSIX_FLAGS_ENABLE)

    def msix_is_masked(self, vector: int) -> bool:
        """Masked by its entry, by the function mask, or while MSI-X is off."""
        flags = int.from_bytes(self.config[self.msix_cap + 2 : self.msix_cap + 4], "little")
        if not flags & PCI_MSIX_FLAGS_ENABLE:
            return True
        return bool(flags & PCI_MSIX_FLAGS_MASKALL) or bool(
            self.msix_table[vector * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL] & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def msix_get_message_data(self, vector: int) -> int:
        off = vector * 16 + PCI_MSIX_ENTRY_DATA
        return int.from_bytes(self.msix_table[off : off + 4], "little")

    def msix_get_message(self, vector: int) -> tuple[int, int]:
        """The entry's (address, data)."""
        base = vector * PCI_MSIX_ENTRY_SIZE
        t = self.msix_table
        lo = int.from_bytes(t[base + PCI_MSIX_ENTRY_LOWER_ADDR : base + 4], "little")
        hi = int.from_bytes(t[base + PCI_MSIX_ENTRY_UPPER_ADDR : base + 8], "little")
        return (hi << 32) | lo, self.msix_get_message_data(vector)

    def msix_vector_use(self, vector: int) -> int:
        """The device uses ``vector`` (a queue or the configuration names it); -EINVAL past
        the table."""
        if vector >= self.msix_entries_nr:
            return -22
        self.msix_entry_used[vector] += 1
        return 0

    def msix_vector_unuse(self, vector: int) -> None:
        if vector >= self.msix_entries_nr or not self.msix_entry_used[vector]:
            return
        self.msix_entry_used[vector] -= 1
        if not self.msix_entry_used[vector]:
            self.msix_clr_pending(vector)

    def msix_unuse_all_vectors(self) -> None:
        """msix_free_irq_entries: no vector in use, none pending."""
        for vector in range(self.msix_entries_nr):
            self.msix_entry_used[vector] = 0
            self.msix_clr_pending(vector)

    def msix_notify(self, vector: int) -> None:
        """Send ``vector``'s message, or, while it is masked, set its pending bit; a vector
        nothing uses sends nothing."""
        if vector >= self.msix_entries_nr or not self.msix_entry_used[vector]:
            return
        if self.msix_is_masked(vector):
            self.msis_masked += 1
            self.msix_set_pending(vector)
            return
        self.msi_send_message(*self.msix_get_message(vector))

    def msi_send_message(self, address: int, data: int) -> None:
        """A DWORD write of ``data`` to ``address`` by the device (bus mastering)."""
        self.msis_sent += 1
        self.msi_send(address, data)

    # -- INTx -----------------------------------------------------------------------------------

    def pci_set_irq(self, level: int) -> None:
        """pci_irq_handler: a change of the pin's level is recorded (PCI_STATUS_INTERRUPT)
        and, unless INTX_DISABLE is set, goes on to the bus (``pci_change_irq_level``)."""
        if level == self.irq_level:
            return
        self.irq_level = level
        self.pci_update_irq_status()
        if self.pci_irq_disabled():
            return
        self.pci_change_irq_level(level)

    def pci_irq_disabled(self) -> bool:
        command = int.from_bytes(self.config[PCI_COMMAND : PCI_COMMAND + 2], "little")
        return bool(command & PCI_COMMAND_INTX_DISABLE)

    def pci_update_irq_status(self) -> None:
        if self.irq_level:
            self.config[PCI_STATUS] |= PCI_STATUS_INTERRUPT
        else:
            self.config[PCI_STATUS] &= ~PCI_STATUS_INTERRUPT & 0xFF

    def pci_update_irq_disabled(self, was_disabled: bool) -> None:
        """INTX_DISABLE changed: an asserted pin is taken off the bus, or put back."""
        if self.irq_level:
            self.pci_change_irq_level(0 if not was_disabled else 1)

    def pci_change_irq_level(self, level: int) -> None:
        """The pin's level on the GSI its interrupt line names (the bus's set_irq)."""
        self.intx_set_irq(self.config[PCI_INTERRUPT_LINE], level)

    def msix_table_mmio_read(self, opaque: object, addr: int, size: int) -> int:
        if addr >= MSIX_PBA_OFFSET:
            a = addr - MSIX_PBA_OFFSET
            return int.from_bytes(self.msix_pba[a : a + size].ljust(size, b"\0"), "little")
        return int.from_bytes(self.msix_table[addr : addr + size].ljust(size, b"\0"), "little")

    def msix_table_mmio_write(self, opaque: object, addr: int, val: int, size: int) -> None:
        if addr + size > len(self.msix_table):
            return
        vector = addr // PCI_MSIX_ENTRY_SIZE
        was_masked = self.msix_is_masked(vector)
        self.msix_table[addr : addr + size] = _le(val, size)
        self.msix_handle_mask_update(vector, was_masked)

    def msix_handle_mask_update(self, vector: int, was_masked: bool) -> None:
        """A change of the vector's mask goes to its notifiers; unmasked with a message
        pending, it is sent now."""
        is_masked = self.msix_is_masked(vector)
        if is_masked == was_masked:
            return
        self.msix_fire_vector_notifier(vector, is_masked)
        if not is_masked and self.msix_is_pending(vector):
            self.msix_clr_pending(vector)
            self.msix_notify(vector)

    def msix_fire_vector_notifier(self, vector: int, is_masked: bool) -> None:
        """The owner of the vector's irqfd (virtio-pci's guest notifiers) learns of the
        (un)mask; an unmask carries the entry's message as it is now."""
        if self.msix_vector_use_notifier is None:
            return
        if is_masked:
            assert self.msix_vector_release_notifier is not None
            self.msix_vector_release_notifier(vector)
        else:
            self.msix_vector_use_notifier(vector, self.msix_get_message(vector))

    def msix_is_pending(self, vector: int) -> bool:
        return bool(self.msix_pba[vector // 8] & (1 << (vector % 8)))

    def msix_set_pending(self, vector: int) -> None:
        self.msix_pba[vector // 8] |= 1 << (vector % 8)

    def msix_clr_pending(self, vector: int) -> None:
        self.msix_pba[vector // 8] &= ~(1 << (vector % 8))

    def msix_mmio_region(self) -> MemoryRegion:
        return MemoryRegion(f"{self.name}-msix", 0x1000,
                            MemoryRegionOps(self.msix_table_mmio_read, self.msix_table_mmio_write))


class PCIHostState:
    """The host bridge's CONFIG_ADDRESS (0xCF8) and CONFIG_DATA (0xCFC) ports, on bus 0."""

    def __init__(self, io_as: AddressSpace) -> None:
        self.config_reg = 0
        self.devices: dict[int, PCIDevice] = {}
        io_as.add_subregion(0xCF8, MemoryRegion("pci-conf-idx", 4, MemoryRegionOps(
            self.pci_host_config_read, self.pci_host_config_write)))
        io_as.add_subregion(0xCFC, MemoryRegion("pci-conf-data", 4, MemoryRegionOps(
            self.pci_host_data_read, self.pci_host_data_write)))

    def pci_register(self, dev: PCIDevice) -> None:
        self.devices[dev.devfn] = dev

    def pci_host_config_write(self, opaque: object, addr: int, val: int, size: int) -> None:
        if addr == 0 and size == 4:
            self.config_reg = val & 0xFFFFFFFF

    def pci_host_config_read(self, opaque: object, addr: int, size: int) -> int:
        return self.config_reg if addr == 0 and size == 4 else 0xFFFFFFFF

    def _target(self, addr: int) -> tuple[PCIDevice | None, int]:
        if not self.config_reg & 0x80000000 or (self.config_reg >> 16) & 0xFF:
            return None, 0
        devfn = (self.config_reg >> 8) & 0xFF
        return self.devices.get(devfn), (self.config_reg & 0xFC) | (addr & 3)

    def pci_host_data_write(self, opaque: object, addr: int, val: int, size: int) -> None:
        dev, reg = self._target(addr)
        if dev is not None:
            dev.pci_default_write_config(reg, val, size)

    def pci_host_data_read(self, opaque: object, addr: int, size: int) -> int:
        dev, reg = self._target(addr)
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.pci_default_read_config(reg, size)
