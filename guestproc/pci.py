"""The guest's PCI core, reduced: configuration mechanism #1 (ports 0xCF8/0xCFC), finding a
function by vendor and device id, its BARs, its interrupt line, and MSI-X (drivers/pci/msi).

Every config access is two trapping port instructions, as on a real i440FX machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.kvm_abi import MSI_ADDR_BASE
from common.virtio_abi import (
    PCI_MSIX_ENTRY_DATA,
    PCI_MSIX_ENTRY_LOWER_ADDR,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_UPPER_ADDR,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
)
from guestproc.cpu import VCpu

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_1 = 0x14
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_TABLE = 4
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS_CAP_LIST = 0x10
PCI_REVISION_ID = 0x08
PCI_STD_NUM_BARS = 6
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_IO_MASK = ~0x3
PCI_BASE_ADDRESS_MEM_MASK = ~0xF
IORESOURCE_IO = 0x100
IORESOURCE_MEM = 0x200


@dataclass
class PciDev:
    """struct pci_dev, the parts a virtio driver uses."""

    cpu: VCpu
    devfn: int
    vendor: int
    device: int
    subsystem_device: int = 0
    revision: int = 0
    io_bar: int = 0
    mem_bar: int = 0
    irq: int = 0
    msix_cap: int = 0
    msix_table: int = 0
    msix_size: int = 0
    msix_enabled: bool = False
    msix_vectors: list[int] = field(default_factory=list)
    resources: dict[int, tuple[int, int, int]] | None = None
    """BAR -> (start, length, IORESOURCE_IO or IORESOURCE_MEM), as pci_read_bases sized them
    (the PCI core does it at enumeration; here at the first look, which only the modern
    transport takes)."""

    def _addr(self, reg: int) -> int:
        return 0x80000000 | (self.devfn << 8) | (reg & 0xFC)

    def read_config_dword(self, reg: int) -> int:
        self.cpu.outl(self._addr(reg), PCI_CONFIG_ADDRESS)
        return self.cpu.inl(PCI_CONFIG_DATA)

    def read_config_word(self, reg: int) -> int:
        self.cpu.outl(self._addr(reg), PCI_CONFIG_ADDRESS)
        return self.cpu.inw(PCI_CONFIG_DATA + (reg & 2))

    def read_config_byte(self, reg: int) -> int:
        self.cpu.outl(self._addr(reg), PCI_CONFIG_ADDRESS)
        return self.cpu.inb(PCI_CONFIG_DATA + (reg & 3))

    def write_config_dword(self, reg: int, value: int) -> None:
        self.cpu.outl(self._addr(reg), PCI_CONFIG_ADDRESS)
        self.cpu.outl(value, PCI_CONFIG_DATA)

    def write_config_word(self, reg: int, value: int) -> None:
        self.cpu.outl(self._addr(reg), PCI_CONFIG_ADDRESS)
        self.cpu.outw(value, PCI_CONFIG_DATA + (reg & 2))

    def pci_find_capability(self, cap_id: int) -> int:
        if not self.read_config_word(PCI_STATUS) & PCI_STATUS_CAP_LIST:
            return 0
        return self._find_next_cap(self.read_config_byte(PCI_CAPABILITY_LIST), cap_id)

    def pci_find_next_capability(self, pos: int, cap_id: int) -> int:
        return self._find_next_cap(self.read_config_byte(pos + 1), cap_id)

    def _find_next_cap(self, pos: int, cap_id: int) -> int:
        """__pci_find_next_cap_ttl: at most 48 links, none into the header."""
        for _ in range(48):
            if pos < 0x40:
                return 0
            if self.read_config_byte(pos) == cap_id:
                return pos
            pos = self.read_config_byte(pos + 1)
        return 0

    def pci_read_bases(self) -> None:
        """__pci_read_base for each BAR: its address, and its size from what reads back
        after writing all ones (then the address goes back); a 64-bit memory BAR takes the
        next one as its upper half."""
        self.resources = {}
        bar = 0
        while bar < PCI_STD_NUM_BARS:
            reg = PCI_BASE_ADDRESS_0 + 4 * bar
            lo = self.read_config_dword(reg)
            self.write_config_dword(reg, 0xFFFFFFFF)
            sz = self.read_config_dword(reg)
            self.write_config_dword(reg, lo)
            is_io = bool(lo & PCI_BASE_ADDRESS_SPACE_IO)
            mask = PCI_BASE_ADDRESS_IO_MASK if is_io else PCI_BASE_ADDRESS_MEM_MASK
            start, size = lo & mask, (~(sz & mask) + 1) & 0xFFFFFFFF
            if is_io:
                size &= 0xFFFF
            width = 1
            if not is_io and lo & PCI_BASE_ADDRESS_MEM_TYPE_64 and bar + 1 < PCI_STD_NUM_BARS:
                start |= self.read_config_dword(reg + 4) << 32
                width = 2
            if sz and size:
                self.resources[bar] = (start, size, IORESOURCE_IO if is_io else IORESOURCE_MEM)
            bar += width

    def _resource(self, bar: int) -> tuple[int, int, int]:
        if self.resources is None:
            self.pci_read_bases()
        assert self.resources is not None
        return self.resources.get(bar, (0, 0, 0))

    def pci_resource_start(self, bar: int) -> int:
        return self._resource(bar)[0]

    def pci_resource_len(self, bar: int) -> int:
        return self._resource(bar)[1]

    def pci_resource_flags(self, bar: int) -> int:
        return self._resource(bar)[2]

    def pci_enable_device(self) -> None:
        cmd = self.read_config_word(PCI_COMMAND)
        self.write_config_word(PCI_COMMAND, cmd | PCI_COMMAND_IO | PCI_COMMAND_MEMORY)

    def pci_set_master(self) -> None:
        cmd = self.read_config_word(PCI_COMMAND)
        self.write_config_word(PCI_COMMAND, cmd | PCI_COMMAND_MASTER)

    def pci_alloc_irq_vectors_msix(self, nvec: int, first_vector: int) -> list[int]:
        """Program ``nvec`` MSI-X table entries (one IDT vector each) and enable MSI-X.

        Returns the IDT vectors; raises ``OSError`` (-ENOSPC) if the table is too small.
        """
        if not self.msix_cap or nvec > self.msix_size:
            raise OSError(28, f"MSI-X: {nvec} vectors wanted, {self.msix_size} available")
        vectors = []
        for entry in range(nvec):
            base = self.mem_bar + self.msix_table + entry * PCI_MSIX_ENTRY_SIZE
            vector = first_vector + entry
            self.cpu.mmio_write(base + PCI_MSIX_ENTRY_LOWER_ADDR, 4, MSI_ADDR_BASE)
            self.cpu.mmio_write(base + PCI_MSIX_ENTRY_UPPER_ADDR, 4, 0)
            self.cpu.mmio_write(base + PCI_MSIX_ENTRY_DATA, 4, vector)
            self.cpu.mmio_write(base + PCI_MSIX_ENTRY_VECTOR_CTRL, 4, 0)
            vectors.append(vector)
        flags = self.read_config_word(self.msix_cap + PCI_MSIX_FLAGS)
        self.write_config_word(self.msix_cap + PCI_MSIX_FLAGS, flags | PCI_MSIX_FLAGS_ENABLE)
        self.msix_enabled = True
        self.msix_vectors = vectors
        return vectors

    def pci_free_irq_vectors(self) -> None:
        if self.msix_enabled:
            flags = self.read_config_word(self.msix_cap + PCI_MSIX_FLAGS)
            self.write_config_word(self.msix_cap + PCI_MSIX_FLAGS, flags & ~PCI_MSIX_FLAGS_ENABLE)
        self.msix_enabled = False
        self.msix_vectors = []


def pci_get_device(cpu: VCpu, vendor: int, device: int | tuple[int, ...]) -> PciDev | None:
    """Scan bus 0 for the function (one of the device ids), as the PCI core's enumeration
    would, and read it."""
    devices = device if isinstance(device, tuple) else (device,)
    probe = PciDev(cpu, 0, 0, 0)
    for slot in range(32):
        probe.devfn = slot << 3
        ids = probe.read_config_dword(PCI_VENDOR_ID)
        if ids & 0xFFFF == 0xFFFF:
            continue
        if ids & 0xFFFF != vendor or ids >> 16 not in devices:
            continue
        dev = PciDev(cpu, slot << 3, vendor, ids >> 16)
        dev.subsystem_device = dev.read_config_word(PCI_SUBSYSTEM_ID)
        dev.revision = dev.read_config_byte(PCI_REVISION_ID)
        dev.io_bar = dev.read_config_dword(PCI_BASE_ADDRESS_0) & ~0x3
        dev.mem_bar = dev.read_config_dword(PCI_BASE_ADDRESS_1) & ~0xF
        dev.irq = dev.read_config_byte(PCI_INTERRUPT_LINE)
        dev.msix_cap = dev.pci_find_capability(PCI_CAP_ID_MSIX)
        if dev.msix_cap:
            dev.msix_size = (dev.read_config_word(dev.msix_cap + PCI_MSIX_FLAGS)
                             & PCI_MSIX_FLAGS_QSIZE) + 1
            dev.msix_table = dev.read_config_dword(dev.msix_cap + PCI_MSIX_TABLE) & ~0x7
        return dev
    return None
