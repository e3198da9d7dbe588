"""Stands for hw/virtio/virtio-pci.c, its virtio 1.0 part: the modern memory BAR and its
capabilities.

``virtio_pci_modern_regions_init`` makes the four regions QEMU puts in the modern BAR (BAR 4,
64-bit prefetchable): common configuration at 0x0, ISR at 0x1000, device configuration at
0x2000 and notifications at 0x3000, 4 KiB each. ``virtio_pci_modern_mem_region_map`` maps
one and describes it to the driver with a vendor capability (struct virtio_pci_cap, or
virtio_pci_notify_cap with notify_off_multiplier = QEMU_VIRTIO_PCI_QUEUE_MEM_MULT) in PCI
configuration space. Queue N's notify address is notify + 4 * N: a write there is
``virtio_pci_notify_write`` (an MMIO exit into QEMU's vCPU thread), or, once DRIVER_OK set
the ioeventfds up, an MMIO ioeventfd that KVM signals without leaving the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from common.trace import trace_event, traced
from common.virtio_abi import (
    PCI_CAP_ID_VNDR,
    QEMU_VIRTIO_PCI_QUEUE_MEM_MULT,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_NET_F_GSO,
    VIRTIO_PCI_CAP,
    VIRTIO_PCI_CAP_BAR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_LENGTH,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_OFFSET,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_PCI_CFG_CAP_SIZE,
    VIRTIO_PCI_COMMON_CFGGENERATION,
    VIRTIO_PCI_COMMON_DF,
    VIRTIO_PCI_COMMON_DFSELECT,
    VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_NUMQ,
    VIRTIO_PCI_COMMON_OFFSET,
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
    VIRTIO_PCI_DEVICE_OFFSET,
    VIRTIO_PCI_ISR_OFFSET,
    VIRTIO_PCI_MODERN_REGION_SIZE,
    VIRTIO_PCI_NOTIFY_CAP_MULT,
    VIRTIO_PCI_NOTIFY_CAP_SIZE,
    VIRTIO_PCI_NOTIFY_OFFSET,
)
from qemuproc.memory import AddressSpace, MemoryRegion, MemoryRegionOps
from qemuproc.virtio import (
    VIRTIO_QUEUE_MAX,
    virtio_error,
    virtio_queue_notify,
    virtio_queue_set_num,
    virtio_queue_set_rings,
    virtio_set_features,
    virtio_set_status,
)

if TYPE_CHECKING:
    from qemuproc.pci import PCIDevice
    from qemuproc.virtio import VirtIODevice

trace_virtio_pci_notify_write = trace_event("virtio_pci_notify_write")

VIRTIO_NET_LEGACY_FEATURES = 1 << VIRTIO_NET_F_GSO
"""virtio-net's vdc->legacy_features: offered over the legacy interface only."""


@dataclass
class VirtIOPCIQueue:
    """What the modern common configuration holds per queue until queue_enable."""

    num: int = 0
    enabled: int = 0
    desc: list[int] = field(default_factory=lambda: [0, 0])
    avail: list[int] = field(default_factory=lambda: [0, 0])
    used: list[int] = field(default_factory=lambda: [0, 0])

    def reset(self) -> None:
        self.num = self.enabled = 0
        self.desc[:] = self.avail[:] = self.used[:] = [0, 0]


class VirtIOPCIProxy(Protocol):
    """The proxy as its modern part sees it (virtio_pci.VirtIOPCIProxy, as virtio-pci.h's
    struct, which both halves of virtio-pci.c share)."""

    vdev: VirtIODevice
    pci_dev: PCIDevice
    vqs: list[VirtIOPCIQueue]
    common: VirtIOPCIRegion
    isr: VirtIOPCIRegion
    device: VirtIOPCIRegion
    notify: VirtIOPCIRegion
    dfselect: int
    gfselect: int
    guest_features: list[int]
    generation: int
    modern_mem_bar_idx: int
    modern_bar_addr: int
    config_cap: int

    def msix_vector_use(self, vector: int) -> bool: ...

    def virtio_pci_reset(self) -> None: ...

    def virtio_pci_start_ioeventfd(self) -> None: ...

    def virtio_pci_stop_ioeventfd(self) -> None: ...


@dataclass
class VirtIOPCIRegion:
    """One region of the modern BAR: its offset, size, cfg_type, and memory region."""

    offset: int
    size: int
    type: int
    mr: MemoryRegion | None = None


def _queue_num(proxy: VirtIOPCIProxy, n: int) -> int:
    vqs = proxy.vdev.vq
    return vqs[n].num if n < len(vqs) else 0


def _queue_vector(proxy: VirtIOPCIProxy, n: int) -> int:
    vqs = proxy.vdev.vq
    return vqs[n].vector if n < len(vqs) else VIRTIO_MSI_NO_VECTOR


def virtio_pci_common_read(proxy: VirtIOPCIProxy, addr: int, size: int) -> int:
    vdev = proxy.vdev
    sel = vdev.queue_sel
    q = proxy.vqs[sel]
    if addr == VIRTIO_PCI_COMMON_DFSELECT:
        val = proxy.dfselect
    elif addr == VIRTIO_PCI_COMMON_DF:
        val = ((vdev.host_features & ~VIRTIO_NET_LEGACY_FEATURES) >> (32 * proxy.dfselect)) \
            if proxy.dfselect <= 1 else 0
    elif addr == VIRTIO_PCI_COMMON_GFSELECT:
        val = proxy.gfselect
    elif addr == VIRTIO_PCI_COMMON_GF:
        val = proxy.guest_features[proxy.gfselect] if proxy.gfselect < 2 else 0
    elif addr == VIRTIO_PCI_COMMON_MSIX:
        val = vdev.config_vector
    elif addr == VIRTIO_PCI_COMMON_NUMQ:
        val = max((i + 1 for i, vq in enumerate(vdev.vq) if vq.num), default=0)
    elif addr == VIRTIO_PCI_COMMON_STATUS:
        val = vdev.status
    elif addr == VIRTIO_PCI_COMMON_CFGGENERATION:
        val = vdev.generation
    elif addr == VIRTIO_PCI_COMMON_Q_SELECT:
        val = sel
    elif addr == VIRTIO_PCI_COMMON_Q_SIZE:
        val = _queue_num(proxy, sel)
    elif addr == VIRTIO_PCI_COMMON_Q_MSIX:
        val = _queue_vector(proxy, sel)
    elif addr == VIRTIO_PCI_COMMON_Q_ENABLE:
        val = q.enabled
    elif addr == VIRTIO_PCI_COMMON_Q_NOFF:
        val = sel  # simply map queues in order
    elif addr in (VIRTIO_PCI_COMMON_Q_DESCLO, VIRTIO_PCI_COMMON_Q_DESCHI):
        val = q.desc[(addr - VIRTIO_PCI_COMMON_Q_DESCLO) >> 2]
    elif addr in (VIRTIO_PCI_COMMON_Q_AVAILLO, VIRTIO_PCI_COMMON_Q_AVAILHI):
        val = q.avail[(addr - VIRTIO_PCI_COMMON_Q_AVAILLO) >> 2]
    elif addr in (VIRTIO_PCI_COMMON_Q_USEDLO, VIRTIO_PCI_COMMON_Q_USEDHI):
        val = q.used[(addr - VIRTIO_PCI_COMMON_Q_USEDLO) >> 2]
    else:
        val = 0
    return val & ((1 << (8 * size)) - 1)


@traced
def virtio_pci_common_write(proxy: VirtIOPCIProxy, addr: int, val: int, size: int) -> None:
    """The fields are C integers: a wider value is cut to the field's width, as storing it
    into QEMU's uint32_t/uint16_t fields does."""
    vdev = proxy.vdev
    val &= 0xFFFFFFFF
    sel = vdev.queue_sel
    q = proxy.vqs[sel]
    if addr == VIRTIO_PCI_COMMON_DFSELECT:
        proxy.dfselect = val
    elif addr == VIRTIO_PCI_COMMON_GFSELECT:
        proxy.gfselect = val
    elif addr == VIRTIO_PCI_COMMON_GF:
        if proxy.gfselect < 2:
            proxy.guest_features[proxy.gfselect] = val
            virtio_set_features(vdev, (proxy.guest_features[1] << 32) | proxy.guest_features[0])
    elif addr == VIRTIO_PCI_COMMON_MSIX:
        vdev.config_vector = proxy.virtio_pci_set_vector(vdev.config_vector, val)
    elif addr == VIRTIO_PCI_COMMON_STATUS:
        if not val & VIRTIO_CONFIG_S_DRIVER_OK:
            proxy.virtio_pci_stop_ioeventfd()
        virtio_set_status(vdev, val & 0xFF)
        if val & VIRTIO_CONFIG_S_DRIVER_OK:
            proxy.virtio_pci_start_ioeventfd()
        if vdev.status == 0:
            proxy.virtio_pci_reset()
    elif addr == VIRTIO_PCI_COMMON_Q_SELECT:
        if val < VIRTIO_QUEUE_MAX:
            vdev.queue_sel = val
    elif addr == VIRTIO_PCI_COMMON_Q_SIZE:
        q.num = val & 0xFFFF
        if sel < len(vdev.vq):
            virtio_queue_set_num(vdev, sel, q.num)
    elif addr == VIRTIO_PCI_COMMON_Q_MSIX:
        if sel < len(vdev.vq):
            vdev.vq[sel].vector = proxy.virtio_pci_set_vector(vdev.vq[sel].vector, val)
    elif addr == VIRTIO_PCI_COMMON_Q_ENABLE:
        if val == 1:
            if sel < len(vdev.vq):
                virtio_queue_set_num(vdev, sel, q.num)
                virtio_queue_set_rings(vdev, sel, (q.desc[1] << 32) | q.desc[0],
                                       (q.avail[1] << 32) | q.avail[0],
                                       (q.used[1] << 32) | q.used[0])
            q.enabled = 1
        else:
            virtio_error(vdev, f"wrong value for queue_enable {val:x}")
    elif addr in (VIRTIO_PCI_COMMON_Q_DESCLO, VIRTIO_PCI_COMMON_Q_DESCHI):
        q.desc[(addr - VIRTIO_PCI_COMMON_Q_DESCLO) >> 2] = val
    elif addr in (VIRTIO_PCI_COMMON_Q_AVAILLO, VIRTIO_PCI_COMMON_Q_AVAILHI):
        q.avail[(addr - VIRTIO_PCI_COMMON_Q_AVAILLO) >> 2] = val
    elif addr in (VIRTIO_PCI_COMMON_Q_USEDLO, VIRTIO_PCI_COMMON_Q_USEDHI):
        q.used[(addr - VIRTIO_PCI_COMMON_Q_USEDLO) >> 2] = val


def virtio_pci_notify_read(proxy: VirtIOPCIProxy, addr: int, size: int) -> int:
    return 0


@traced
def virtio_pci_notify_write(proxy: VirtIOPCIProxy, addr: int, val: int, size: int) -> None:
    """A kick that reached QEMU (no ioeventfd took it): the queue is the address's."""
    if trace_virtio_pci_notify_write.on:
        trace_virtio_pci_notify_write(addr=addr, val=val, size=size)
    queue = addr // QEMU_VIRTIO_PCI_QUEUE_MEM_MULT
    if queue < VIRTIO_QUEUE_MAX:
        virtio_queue_notify(proxy.vdev, queue)


def virtio_pci_isr_read(proxy: VirtIOPCIProxy, addr: int, size: int) -> int:
    """Reading the ISR clears it and deasserts INTx."""
    vdev = proxy.vdev
    val = vdev.isr
    vdev.isr = 0
    proxy.pci_dev.pci_set_irq(0)
    return val


def virtio_pci_isr_write(proxy: VirtIOPCIProxy, addr: int, val: int, size: int) -> None:
    pass


def virtio_pci_device_read(proxy: VirtIOPCIProxy, addr: int, size: int) -> int:
    """virtio_config_modern_read{b,w,l}: past the config's end reads all ones."""
    if size not in (1, 2, 4):
        return 0
    data = proxy.vdev.get_config()
    if addr + size > len(data):
        return (1 << (8 * size)) - 1
    return int.from_bytes(data[addr : addr + size], "little")


def virtio_pci_device_write(proxy: VirtIOPCIProxy, addr: int, val: int, size: int) -> None:
    data = bytearray(proxy.vdev.get_config())
    if size in (1, 2, 4) and addr + size <= len(data):
        data[addr : addr + size] = (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        proxy.vdev.set_config(bytes(data))


def virtio_pci_modern_regions_init(proxy: VirtIOPCIProxy, vdev_name: str) -> None:
    """The four regions of the modern BAR, named as QEMU names them."""
    for region, kind, read, write in (
            (proxy.common, "common", virtio_pci_common_read, virtio_pci_common_write),
            (proxy.isr, "isr", virtio_pci_isr_read, virtio_pci_isr_write),
            (proxy.device, "device", virtio_pci_device_read, virtio_pci_device_write),
            (proxy.notify, "notify", virtio_pci_notify_read, virtio_pci_notify_write)):
        region.mr = MemoryRegion(f"virtio-pci-{kind}-{vdev_name}", region.size,
                                 MemoryRegionOps(read, write), proxy)


def virtio_pci_add_mem_cap(proxy: VirtIOPCIProxy, cfg_type: int, bar: int, offset: int,
                           length: int, cap_len: int, extra: bytes = b"") -> int:
    """A vendor capability carrying struct virtio_pci_cap (and what follows it)."""
    dev = proxy.pci_dev
    pos = dev.pci_add_capability(PCI_CAP_ID_VNDR, cap_len)
    cap = VIRTIO_PCI_CAP.pack(PCI_CAP_ID_VNDR, dev.config[pos + 1], cap_len, cfg_type, bar, 0,
                              offset, length)
    dev.config[pos + 2 : pos + cap_len] = (cap[2:] + extra).ljust(cap_len - 2, b"\0")
    return pos


def virtio_pci_modern_mem_region_map(proxy: VirtIOPCIProxy, region: VirtIOPCIRegion,
                                     mem_as: AddressSpace, extra: bytes = b"") -> None:
    """Map the region in the modern BAR and describe it with a capability."""
    assert region.mr is not None
    mem_as.add_subregion(proxy.modern_bar_addr + region.offset, region.mr)
    cap_len = VIRTIO_PCI_NOTIFY_CAP_SIZE if extra else VIRTIO_PCI_CAP.size
    virtio_pci_add_mem_cap(proxy, region.type, proxy.modern_mem_bar_idx, region.offset,
                           region.size, cap_len, extra)


def plug_modern_interface(proxy: VirtIOPCIProxy, mem_as: AddressSpace) -> None:
    """virtio_pci_device_plugged's modern part: the regions, their capabilities, then the
    VIRTIO_PCI_CAP_PCI_CFG window (whose bar/offset/length the driver may write)."""
    virtio_pci_modern_regions_init(proxy, proxy.vdev.name)
    for region in (proxy.common, proxy.isr, proxy.device):
        virtio_pci_modern_mem_region_map(proxy, region, mem_as)
    virtio_pci_modern_mem_region_map(
        proxy, proxy.notify, mem_as, QEMU_VIRTIO_PCI_QUEUE_MEM_MULT.to_bytes(4, "little"))
    pos = virtio_pci_add_mem_cap(proxy, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0,
                                 VIRTIO_PCI_CFG_CAP_SIZE)
    wmask = proxy.pci_dev.wmask
    wmask[pos + VIRTIO_PCI_CAP_BAR] = 0xFF
    for off in (VIRTIO_PCI_CAP_OFFSET, VIRTIO_PCI_CAP_LENGTH, VIRTIO_PCI_NOTIFY_CAP_MULT):
        wmask[pos + off : pos + off + 4] = b"\xff\xff\xff\xff"
    proxy.config_cap = pos


def modern_bar_regions() -> tuple[VirtIOPCIRegion, VirtIOPCIRegion, VirtIOPCIRegion,
                                  VirtIOPCIRegion]:
    """common, isr, device, notify at the offsets virtio_pci_realize gives them."""
    size = VIRTIO_PCI_MODERN_REGION_SIZE
    return (VirtIOPCIRegion(VIRTIO_PCI_COMMON_OFFSET, size, VIRTIO_PCI_CAP_COMMON_CFG),
            VirtIOPCIRegion(VIRTIO_PCI_ISR_OFFSET, size, VIRTIO_PCI_CAP_ISR_CFG),
            VirtIOPCIRegion(VIRTIO_PCI_DEVICE_OFFSET, size, VIRTIO_PCI_CAP_DEVICE_CFG),
            VirtIOPCIRegion(VIRTIO_PCI_NOTIFY_OFFSET, size, VIRTIO_PCI_CAP_NOTIFY_CFG))
