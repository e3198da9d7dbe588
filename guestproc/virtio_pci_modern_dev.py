"""Stands for drivers/virtio/virtio_pci_modern_dev.c: finding and mapping a virtio 1.0
function's capabilities, and the accessors of its common configuration structure.

Every register below is an MMIO access to the modern memory BAR (a load or store that exits
to KVM and on to QEMU's region handlers); capability reads are PCI config cycles.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.virtio_abi import (
    PCI_CAP_ID_VNDR,
    VIRTIO_PCI_CAP_BAR,
    VIRTIO_PCI_CAP_CFG_TYPE,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_LENGTH,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_OFFSET,
    VIRTIO_PCI_COMMON_CFG_SIZE,
    VIRTIO_PCI_COMMON_CFGGENERATION,
    VIRTIO_PCI_COMMON_DF,
    VIRTIO_PCI_COMMON_DFSELECT,
    VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_NUMQ,
    VIRTIO_PCI_COMMON_Q_AVAILHI,
    VIRTIO_PCI_COMMON_Q_AVAILLO,
    VIRTIO_PCI_COMMON_Q_DESCHI,
    VIRTIO_PCI_COMMON_Q_DESCLO,
    VIRTIO_PCI_COMMON_Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_NOFF,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_SIZE,
    VIRTIO_PCI_COMMON_Q_USEDHI,
    VIRTIO_PCI_COMMON_Q_USEDLO,
    VIRTIO_PCI_COMMON_STATUS,
    VIRTIO_PCI_NOTIFY_CAP_MULT,
)
from guestproc.iomap import ioread8, ioread16, ioread32, iowrite8, iowrite16, iowrite32
from guestproc.pci import IORESOURCE_IO, IORESOURCE_MEM, PCI_STD_NUM_BARS, PciDev

PAGE_SIZE = 4096


class VirtioPciModernError(OSError):
    """vp_modern_probe's failures: the message Linux's dev_err prints."""


@dataclass
class VirtioPciModernDevice:
    """struct virtio_pci_modern_device: where each structure was mapped (guest-physical)."""

    pci_dev: PciDev
    device_id: int = 0
    common: int = 0
    isr: int = 0
    device: int = 0
    device_len: int = 0
    notify_base: int = 0
    notify_len: int = 0
    notify_map_cap: int = 0
    notify_offset_multiplier: int = 0
    modern_bars: int = 0


def virtio_pci_find_capability(dev: PciDev, cfg_type: int, ioresource_types: int,
                               mdev: VirtioPciModernDevice) -> int:
    """The first vendor capability of ``cfg_type`` whose BAR is a resource of those types."""
    pos = dev.pci_find_capability(PCI_CAP_ID_VNDR)
    while pos > 0:
        ctype = dev.read_config_byte(pos + VIRTIO_PCI_CAP_CFG_TYPE)
        bar = dev.read_config_byte(pos + VIRTIO_PCI_CAP_BAR)
        if bar < PCI_STD_NUM_BARS and ctype == cfg_type and dev.pci_resource_len(bar) \
                and dev.pci_resource_flags(bar) & ioresource_types:
            mdev.modern_bars |= 1 << bar
            return pos
        pos = dev.pci_find_next_capability(pos, PCI_CAP_ID_VNDR)
    return 0


def vp_modern_map_capability(mdev: VirtioPciModernDevice, off: int, minlen: int, align: int,
                             start: int, size: int) -> tuple[int, int]:
    """Check the capability at ``off`` against its BAR and map ``size`` bytes of it (from
    ``start``): (address, length mapped)."""
    dev = mdev.pci_dev
    bar = dev.read_config_byte(off + VIRTIO_PCI_CAP_BAR)
    offset = dev.read_config_dword(off + VIRTIO_PCI_CAP_OFFSET)
    length = dev.read_config_dword(off + VIRTIO_PCI_CAP_LENGTH)
    if bar >= PCI_STD_NUM_BARS or not mdev.modern_bars & (1 << bar):
        raise VirtioPciModernError(22, f"virtio_pci: bar unexpectedly changed to {bar}")
    if length <= start:
        raise VirtioPciModernError(22, f"virtio_pci: bad capability len {length} "
                                       f"(>{start} expected)")
    if length - start < minlen:
        raise VirtioPciModernError(22, f"virtio_pci: bad capability len {length} "
                                       f"(>={minlen} expected)")
    length -= start
    if start + offset > 0xFFFFFFFF:
        raise VirtioPciModernError(22, f"virtio_pci: map wrap-around {start}+{offset}")
    offset += start
    if offset & (align - 1):
        raise VirtioPciModernError(22, f"virtio_pci: offset {offset} not aligned to {align}")
    length = min(length, size)
    if minlen + offset > dev.pci_resource_len(bar):
        raise VirtioPciModernError(22, f"virtio_pci: map virtio {minlen}@{offset} out of "
                                       f"range on bar {bar} length "
                                       f"{dev.pci_resource_len(bar)}")
    return dev.pci_resource_start(bar) + offset, length


def vp_modern_probe(mdev: VirtioPciModernDevice) -> None:
    """Find the common, ISR, notify and device structures and map them; ENODEV (leave the
    function to the legacy driver) if there is no common configuration."""
    dev = mdev.pci_dev
    if not 0x1000 <= dev.device <= 0x107F:
        raise VirtioPciModernError(19, "not a virtio function")
    # transitional: the subsystem id is the virtio id, as the legacy driver uses it
    mdev.device_id = dev.subsystem_device if dev.device < 0x1040 else dev.device - 0x1040
    types = IORESOURCE_IO | IORESOURCE_MEM
    common = virtio_pci_find_capability(dev, VIRTIO_PCI_CAP_COMMON_CFG, types, mdev)
    if not common:
        raise VirtioPciModernError(19, "virtio_pci: leaving for legacy driver")
    isr = virtio_pci_find_capability(dev, VIRTIO_PCI_CAP_ISR_CFG, types, mdev)
    notify = virtio_pci_find_capability(dev, VIRTIO_PCI_CAP_NOTIFY_CFG, types, mdev)
    if not isr or not notify:
        raise VirtioPciModernError(22, f"virtio_pci: missing capabilities "
                                       f"{common}/{isr}/{notify}")
    device = virtio_pci_find_capability(dev, VIRTIO_PCI_CAP_DEVICE_CFG, types, mdev)
    mdev.common, _ = vp_modern_map_capability(mdev, common, VIRTIO_PCI_COMMON_CFG_SIZE, 4, 0,
                                              VIRTIO_PCI_COMMON_CFG_SIZE)
    mdev.isr, _ = vp_modern_map_capability(mdev, isr, 1, 1, 0, 1)
    mdev.notify_offset_multiplier = dev.read_config_dword(notify + VIRTIO_PCI_NOTIFY_CAP_MULT)
    notify_length = dev.read_config_dword(notify + VIRTIO_PCI_CAP_LENGTH)
    notify_offset = dev.read_config_dword(notify + VIRTIO_PCI_CAP_OFFSET)
    if notify_length + notify_offset % PAGE_SIZE <= PAGE_SIZE:  # small: map it all now
        mdev.notify_base, mdev.notify_len = vp_modern_map_capability(mdev, notify, 2, 2, 0,
                                                                     notify_length)
    else:
        mdev.notify_map_cap = notify
    if device:
        mdev.device, mdev.device_len = vp_modern_map_capability(mdev, device, 0, 4, 0,
                                                                PAGE_SIZE)


def vp_modern_get_features(mdev: VirtioPciModernDevice) -> int:
    cpu, cfg = mdev.pci_dev.cpu, mdev.common
    iowrite32(cpu, 0, cfg + VIRTIO_PCI_COMMON_DFSELECT)
    features = ioread32(cpu, cfg + VIRTIO_PCI_COMMON_DF)
    iowrite32(cpu, 1, cfg + VIRTIO_PCI_COMMON_DFSELECT)
    return features | ioread32(cpu, cfg + VIRTIO_PCI_COMMON_DF) << 32


def vp_modern_set_features(mdev: VirtioPciModernDevice, features: int) -> None:
    cpu, cfg = mdev.pci_dev.cpu, mdev.common
    iowrite32(cpu, 0, cfg + VIRTIO_PCI_COMMON_GFSELECT)
    iowrite32(cpu, features & 0xFFFFFFFF, cfg + VIRTIO_PCI_COMMON_GF)
    iowrite32(cpu, 1, cfg + VIRTIO_PCI_COMMON_GFSELECT)
    iowrite32(cpu, features >> 32, cfg + VIRTIO_PCI_COMMON_GF)


def vp_modern_generation(mdev: VirtioPciModernDevice) -> int:
    return ioread8(mdev.pci_dev.cpu, mdev.common + VIRTIO_PCI_COMMON_CFGGENERATION)


def vp_modern_get_status(mdev: VirtioPciModernDevice) -> int:
    return ioread8(mdev.pci_dev.cpu, mdev.common + VIRTIO_PCI_COMMON_STATUS)


def vp_modern_set_status(mdev: VirtioPciModernDevice, status: int) -> None:
    iowrite8(mdev.pci_dev.cpu, status, mdev.common + VIRTIO_PCI_COMMON_STATUS)


def _select(mdev: VirtioPciModernDevice, index: int) -> None:
    iowrite16(mdev.pci_dev.cpu, index, mdev.common + VIRTIO_PCI_COMMON_Q_SELECT)


def vp_modern_queue_vector(mdev: VirtioPciModernDevice, index: int, vector: int) -> int:
    """Set queue ``index``'s MSI-X vector; the read back flushes it (NO_VECTOR: refused)."""
    cpu, cfg = mdev.pci_dev.cpu, mdev.common
    _select(mdev, index)
    iowrite16(cpu, vector, cfg + VIRTIO_PCI_COMMON_Q_MSIX)
    return ioread16(cpu, cfg + VIRTIO_PCI_COMMON_Q_MSIX)


def vp_modern_config_vector(mdev: VirtioPciModernDevice, vector: int) -> int:
    cpu, cfg = mdev.pci_dev.cpu, mdev.common
    iowrite16(cpu, vector, cfg + VIRTIO_PCI_COMMON_MSIX)
    return ioread16(cpu, cfg + VIRTIO_PCI_COMMON_MSIX)


def vp_iowrite64_twopart(mdev: VirtioPciModernDevice, val: int, lo: int, hi: int) -> None:
    iowrite32(mdev.pci_dev.cpu, val & 0xFFFFFFFF, mdev.common + lo)
    iowrite32(mdev.pci_dev.cpu, val >> 32, mdev.common + hi)


def vp_modern_queue_address(mdev: VirtioPciModernDevice, index: int, desc_addr: int,
                            driver_addr: int, device_addr: int) -> None:
    _select(mdev, index)
    vp_iowrite64_twopart(mdev, desc_addr, VIRTIO_PCI_COMMON_Q_DESCLO, VIRTIO_PCI_COMMON_Q_DESCHI)
    vp_iowrite64_twopart(mdev, driver_addr, VIRTIO_PCI_COMMON_Q_AVAILLO,
                         VIRTIO_PCI_COMMON_Q_AVAILHI)
    vp_iowrite64_twopart(mdev, device_addr, VIRTIO_PCI_COMMON_Q_USEDLO,
                         VIRTIO_PCI_COMMON_Q_USEDHI)


def vp_modern_set_queue_enable(mdev: VirtioPciModernDevice, index: int, enable: bool) -> None:
    _select(mdev, index)
    iowrite16(mdev.pci_dev.cpu, int(enable), mdev.common + VIRTIO_PCI_COMMON_Q_ENABLE)


def vp_modern_get_queue_enable(mdev: VirtioPciModernDevice, index: int) -> bool:
    _select(mdev, index)
    return bool(ioread16(mdev.pci_dev.cpu, mdev.common + VIRTIO_PCI_COMMON_Q_ENABLE))


def vp_modern_set_queue_size(mdev: VirtioPciModernDevice, index: int, size: int) -> None:
    _select(mdev, index)
    iowrite16(mdev.pci_dev.cpu, size, mdev.common + VIRTIO_PCI_COMMON_Q_SIZE)


def vp_modern_get_queue_size(mdev: VirtioPciModernDevice, index: int) -> int:
    _select(mdev, index)
    return ioread16(mdev.pci_dev.cpu, mdev.common + VIRTIO_PCI_COMMON_Q_SIZE)


def vp_modern_get_num_queues(mdev: VirtioPciModernDevice) -> int:
    return ioread16(mdev.pci_dev.cpu, mdev.common + VIRTIO_PCI_COMMON_NUMQ)


def vp_modern_get_queue_notify_off(mdev: VirtioPciModernDevice, index: int) -> int:
    _select(mdev, index)
    return ioread16(mdev.pci_dev.cpu, mdev.common + VIRTIO_PCI_COMMON_Q_NOFF)


def vp_modern_map_vq_notify(mdev: VirtioPciModernDevice, index: int) -> int:
    """Queue ``index``'s notify address: notify_base + queue_notify_off * multiplier; 0 if
    it lies outside the notify structure."""
    off = vp_modern_get_queue_notify_off(mdev, index)
    if mdev.notify_base:
        if off * mdev.notify_offset_multiplier + 2 > mdev.notify_len:
            return 0  # "bad notification offset"
        return mdev.notify_base + off * mdev.notify_offset_multiplier
    addr, _ = vp_modern_map_capability(mdev, mdev.notify_map_cap, 2, 2,
                                       off * mdev.notify_offset_multiplier, 2)
    return addr
