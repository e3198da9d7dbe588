"""Stands for drivers/virtio/virtio_pci_legacy.c and virtio_pci_common.c: virtio over the
legacy PCI I/O BAR (every register access below is a trapping port instruction), and the
transport-independent part: vectors, interrupts, finding the queues. The transport fills in
``setup_vq``, ``del_vq``, ``config_vector`` and ``isr`` (struct virtio_pci_device's hooks);
virtio_pci_modern.py is the other one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.kvm_abi import ISA_IRQ_VECTOR_BASE
from common.trace import trace_event, traced
from common.virtio_abi import (
    VIRTIO_MSI_CONFIG_VECTOR,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_MSI_QUEUE_VECTOR,
    VIRTIO_PCI_GUEST_FEATURES,
    VIRTIO_PCI_HOST_FEATURES,
    VIRTIO_PCI_ISR,
    VIRTIO_PCI_ISR_CONFIG,
    VIRTIO_PCI_QUEUE_ADDR_SHIFT,
    VIRTIO_PCI_QUEUE_NOTIFY,
    VIRTIO_PCI_QUEUE_NUM,
    VIRTIO_PCI_QUEUE_PFN,
    VIRTIO_PCI_QUEUE_SEL,
    VIRTIO_PCI_STATUS,
    VIRTIO_PCI_VRING_ALIGN,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    virtio_pci_config_off,
)
from common.vring import vring_size
from guestproc.cpu import VCpu
from guestproc.iomap import ioread8, iowrite16
from guestproc.kernel import IRQ_HANDLED, IRQ_NONE, Kernel
from guestproc.mm import OutOfMemory, PageAllocator
from guestproc.pci import PciDev
from guestproc.virtio import (
    VirtioConfigOps,
    VirtioDriver,
    virtio_config_changed,
    vring_transport_features,
)
from guestproc.virtio_ring import (
    Virtqueue,
    vring_create_virtqueue,
    vring_indirect_size,
    vring_interrupt,
)

VP_MSIX_CONFIG_VECTOR = 0
VP_MSIX_VQ_VECTOR = 1
FIRST_DEVICE_VECTOR = 38  # the IDT vector of MSI-X entry 0

trace_vp_notify = trace_event("vp_notify")
trace_vp_interrupt = trace_event("vp_interrupt")


class VirtioPciDevice:
    """struct virtio_pci_device, with the struct virtio_device it embeds."""

    def __init__(self, pci_dev: PciDev, kernel: Kernel, ram: memoryview,
                 pages: PageAllocator) -> None:
        self.pci_dev = pci_dev
        self.cpu: VCpu = pci_dev.cpu
        self.kernel = kernel
        self.ram = ram
        self.pages = pages
        self.ioaddr = pci_dev.io_bar
        self.isr = self.ioaddr + VIRTIO_PCI_ISR
        self.setup_vq: Callable[..., Virtqueue] = setup_vq
        self.del_vq: Callable[[VirtioPciDevice, Virtqueue], None] = del_vq
        self.config_vector: Callable[[VirtioPciDevice, int], int] = vp_config_vector
        self.mdev: Any = None  # struct virtio_pci_modern_device, on the modern transport
        self.transport = "legacy"
        self.index = 0
        self.name = "virtio0"
        self.features = 0
        self.config = virtio_pci_config_ops
        self.priv: Any = None
        self.vqs: list[Virtqueue | None] = []
        self.msix_enabled = False
        self.intx_enabled = False
        self.per_vq_vectors = False
        self.msix_used_vectors = 0
        self.msix_names: list[str] = []
        self.idt_vectors: list[int] = []
        self.isr_reads = 0
        self.config_changes = 0
        self.driver: VirtioDriver | None = None
        # queue index -> (num, ring, indirect tables), kept across resets: the bump
        # allocator cannot free what vring_del_virtqueue would
        self.vring_pages: dict[int, tuple[int, int, int]] = {}


# -- virtio_config_ops ---------------------------------------------------------------------------


def vp_get(vdev: VirtioPciDevice, offset: int, length: int) -> bytes:
    """Read device config: byte by byte through the I/O BAR, as the legacy transport does."""
    ioaddr = vdev.ioaddr + virtio_pci_config_off(vdev.msix_enabled) + offset
    return bytes(vdev.cpu.inb(ioaddr + i) for i in range(length))


def vp_set(vdev: VirtioPciDevice, offset: int, buf: bytes) -> None:
    ioaddr = vdev.ioaddr + virtio_pci_config_off(vdev.msix_enabled) + offset
    for i, b in enumerate(buf):
        vdev.cpu.outb(b, ioaddr + i)


def vp_get_status(vdev: VirtioPciDevice) -> int:
    return vdev.cpu.inb(vdev.ioaddr + VIRTIO_PCI_STATUS)


def vp_set_status(vdev: VirtioPciDevice, status: int) -> None:
    """We should never be setting status to 0 here (that is vp_reset)."""
    vdev.cpu.outb(status, vdev.ioaddr + VIRTIO_PCI_STATUS)


def vp_reset(vdev: VirtioPciDevice) -> None:
    vdev.cpu.outb(0, vdev.ioaddr + VIRTIO_PCI_STATUS)
    # flush the status write, and with it any in-flight device writes and MSI-X interrupts
    vdev.cpu.inb(vdev.ioaddr + VIRTIO_PCI_STATUS)
    vp_synchronize_vectors(vdev)  # flush pending VQ/configuration callbacks


def vp_synchronize_vectors(vdev: VirtioPciDevice) -> None:
    """virtio_pci_common.c: wait for the handlers of the device's interrupts to finish."""
    if vdev.intx_enabled:
        vdev.kernel.synchronize_irq(ISA_IRQ_VECTOR_BASE + vdev.pci_dev.irq)
    for vector in vdev.idt_vectors:
        vdev.kernel.synchronize_irq(vector)


def vp_get_features(vdev: VirtioPciDevice) -> int:
    return vdev.cpu.inl(vdev.ioaddr + VIRTIO_PCI_HOST_FEATURES)


def vp_finalize_features(vdev: VirtioPciDevice) -> int:
    vring_transport_features(vdev)
    vdev.cpu.outl(vdev.features & 0xFFFFFFFF, vdev.ioaddr + VIRTIO_PCI_GUEST_FEATURES)
    return 0


def vp_bus_name(vdev: VirtioPciDevice) -> str:
    return f"0000:00:{vdev.pci_dev.devfn >> 3:02x}.{vdev.pci_dev.devfn & 7}"


def vp_set_vq_affinity(vq: Virtqueue, cpu: int) -> int:
    return 0  # one vCPU: every vector already lands on it


@traced
def vp_notify(vq: Virtqueue) -> bool:
    """Kick the device: iowrite16 of the queue's index to its notify register: QUEUE_NOTIFY
    in the legacy I/O BAR (a trapping OUT), or the queue's notify address in the modern
    BAR (a store that exits as MMIO)."""
    vdev: VirtioPciDevice = vq.vdev
    if trace_vp_notify.on:
        if vq.priv < 0x10000:
            trace_vp_notify(vq=vq.name, index=vq.index, port=vq.priv)
        else:
            trace_vp_notify(vq=vq.name, index=vq.index, addr=vq.priv)
    iowrite16(vdev.cpu, vq.index, vq.priv)
    return True


# -- interrupts ----------------------------------------------------------------------------------


def vp_config_changed(irq: int, vdev: VirtioPciDevice) -> int:
    """The config interrupt: virtio_config_changed -> the driver's config_changed."""
    vdev.config_changes += 1
    virtio_config_changed(vdev)
    return IRQ_HANDLED


def vp_vring_interrupt(irq: int, vdev: VirtioPciDevice) -> int:
    ret = IRQ_NONE
    for vq in vdev.vqs:
        if vq is not None and vring_interrupt(irq, vq) == IRQ_HANDLED:
            ret = IRQ_HANDLED
    return ret


@traced
def vp_interrupt(irq: int, vdev: VirtioPciDevice) -> int:
    """The INTx handler: reading ISR tells why, and clears it (and lowers the line)."""
    isr = ioread8(vdev.cpu, vdev.isr)
    vdev.isr_reads += 1
    if trace_vp_interrupt.on:
        trace_vp_interrupt(isr=isr)
    if not isr:
        return IRQ_NONE
    if isr & VIRTIO_PCI_ISR_CONFIG:
        vp_config_changed(irq, vdev)
    return vp_vring_interrupt(irq, vdev)


def vp_config_vector(vdev: VirtioPciDevice, vector: int) -> int:
    vdev.cpu.outw(vector, vdev.ioaddr + VIRTIO_MSI_CONFIG_VECTOR)
    return vdev.cpu.inw(vdev.ioaddr + VIRTIO_MSI_CONFIG_VECTOR)


def vp_request_msix_vectors(vdev: VirtioPciDevice, nvectors: int, per_vq_vectors: bool) -> None:
    vdev.idt_vectors = vdev.pci_dev.pci_alloc_irq_vectors_msix(nvectors, FIRST_DEVICE_VECTOR)
    vdev.msix_enabled = True
    vdev.msix_names = [""] * nvectors
    v = vdev.msix_used_vectors
    vdev.msix_names[v] = f"{vdev.name}-config"
    vdev.kernel.request_irq(vdev.idt_vectors[v], lambda irq: vp_config_changed(irq, vdev),
                            vdev.msix_names[v])
    vdev.msix_used_vectors += 1
    if vdev.config_vector(vdev, v) == VIRTIO_MSI_NO_VECTOR:
        raise OSError(16, "device refused the config vector")
    if not per_vq_vectors:
        v = vdev.msix_used_vectors
        vdev.msix_names[v] = f"{vdev.name}-virtqueues"
        vdev.kernel.request_irq(vdev.idt_vectors[v], lambda irq: vp_vring_interrupt(irq, vdev),
                                vdev.msix_names[v])
        vdev.msix_used_vectors += 1


def vp_vring_pages(vdev: VirtioPciDevice, index: int, num: int,
                   align: int = VIRTIO_PCI_VRING_ALIGN) -> tuple[int, int]:
    """Guest RAM for queue ``index``'s ring and, with VIRTIO_RING_F_INDIRECT_DESC, its heads'
    indirect tables (0 if there is no room for them: the ring then goes without)."""
    kept = vdev.vring_pages.get(index)
    want_indirect = bool(vdev.features & (1 << VIRTIO_RING_F_INDIRECT_DESC))
    if kept is not None and kept[0] == num and (kept[2] or not want_indirect):
        return kept[1], kept[2] if want_indirect else 0
    base = vdev.pages.alloc(vring_size(num, align), VIRTIO_PCI_VRING_ALIGN)
    indirect = 0
    if want_indirect:
        try:
            indirect = vdev.pages.alloc(vring_indirect_size(num), 16)
        except OutOfMemory:
            pass
    vdev.vring_pages[index] = (num, base, indirect)
    return base, indirect


@traced
def setup_vq(vdev: VirtioPciDevice, index: int, callback: Callable[[Virtqueue], None] | None,
             name: str, msix_vec: int) -> Virtqueue:
    cpu, io = vdev.cpu, vdev.ioaddr
    cpu.outw(index, io + VIRTIO_PCI_QUEUE_SEL)
    num = cpu.inw(io + VIRTIO_PCI_QUEUE_NUM)
    if not num or cpu.inl(io + VIRTIO_PCI_QUEUE_PFN):
        raise OSError(2, f"queue {index} not available")
    base, indirect = vp_vring_pages(vdev, index, num)
    vq = vring_create_virtqueue(index, num, base, vdev.ram, vdev, vp_notify, callback, name,
                                bool(vdev.features & (1 << VIRTIO_RING_F_EVENT_IDX)),
                                indirect_base=indirect)
    cpu.outl(base >> VIRTIO_PCI_QUEUE_ADDR_SHIFT, io + VIRTIO_PCI_QUEUE_PFN)
    vq.priv = io + VIRTIO_PCI_QUEUE_NOTIFY
    if msix_vec != VIRTIO_MSI_NO_VECTOR:
        cpu.outw(msix_vec, io + VIRTIO_MSI_QUEUE_VECTOR)
        if cpu.inw(io + VIRTIO_MSI_QUEUE_VECTOR) == VIRTIO_MSI_NO_VECTOR:
            cpu.outl(0, io + VIRTIO_PCI_QUEUE_PFN)
            raise OSError(16, f"queue {index}: device refused MSI-X vector {msix_vec}")
    return vq


def del_vq(vdev: VirtioPciDevice, vq: Virtqueue) -> None:
    cpu, io = vdev.cpu, vdev.ioaddr
    cpu.outw(vq.index, io + VIRTIO_PCI_QUEUE_SEL)
    if vdev.msix_enabled:
        cpu.outw(VIRTIO_MSI_NO_VECTOR, io + VIRTIO_MSI_QUEUE_VECTOR)
        cpu.inb(io + VIRTIO_PCI_ISR)  # flush the write out to the device
    cpu.outl(0, io + VIRTIO_PCI_QUEUE_PFN)


def vp_del_vqs(vdev: VirtioPciDevice) -> None:
    for vq in vdev.vqs:
        if vq is not None:
            vdev.del_vq(vdev, vq)
    vdev.vqs = []
    for v in vdev.idt_vectors:
        vdev.kernel.free_irq(v)
    if vdev.intx_enabled:
        vdev.kernel.free_intx(vdev.pci_dev.irq)
        vdev.intx_enabled = False
    if vdev.msix_enabled:
        vdev.pci_dev.pci_free_irq_vectors()
    vdev.msix_enabled = False
    vdev.msix_used_vectors = 0
    vdev.idt_vectors = []


@traced
def vp_try_to_find_vqs(vdev: VirtioPciDevice, nvqs: int,
                       callbacks: list[Callable[[Virtqueue], None] | None],
                       names: list[str | None], use_msix: bool,
                       per_vq_vectors: bool) -> list[Virtqueue | None]:
    if not use_msix:
        # old style: one normal interrupt for config changes and all queues
        vdev.kernel.request_intx(vdev.pci_dev.irq, lambda irq: vp_interrupt(irq, vdev),
                                 vdev.name)
        vdev.intx_enabled = True
    else:
        nvectors = 1 + sum(1 for c in callbacks if c) if per_vq_vectors else 2
        vp_request_msix_vectors(vdev, nvectors, per_vq_vectors)
    vdev.per_vq_vectors = per_vq_vectors
    allocated = vdev.msix_used_vectors
    vqs: list[Virtqueue | None] = []
    vdev.vqs = vqs
    for i in range(nvqs):
        name = names[i]
        if not name:
            vqs.append(None)
            continue
        if not callbacks[i] or not vdev.msix_enabled:
            msix_vec = VIRTIO_MSI_NO_VECTOR
        elif per_vq_vectors:
            msix_vec = allocated
            allocated += 1
        else:
            msix_vec = VP_MSIX_VQ_VECTOR
        vq = vdev.setup_vq(vdev, i, callbacks[i], name, msix_vec)
        vqs.append(vq)
        if not per_vq_vectors or msix_vec == VIRTIO_MSI_NO_VECTOR:
            continue
        irq_name = f"{vdev.name}-{name}"
        vdev.msix_names[msix_vec] = irq_name
        vdev.kernel.request_irq(vdev.idt_vectors[msix_vec],
                                lambda irq, q=vq: vring_interrupt(irq, q), irq_name)
    return vqs


@traced
def vp_find_vqs(vdev: VirtioPciDevice, nvqs: int,
                callbacks: list[Callable[[Virtqueue], None] | None],
                names: list[str | None]) -> list[Virtqueue | None]:
    """Try MSI-X with one vector per queue, then one vector shared by the queues, then INTx."""
    for use_msix, per_vq in ((True, True), (True, False), (False, False)):
        try:
            return vp_try_to_find_vqs(vdev, nvqs, callbacks, names, use_msix, per_vq)
        except OSError:
            vp_del_vqs(vdev)
    raise OSError(19, "no interrupt scheme worked")


virtio_pci_config_ops = VirtioConfigOps(
    get=vp_get,
    set=vp_set,
    get_status=vp_get_status,
    set_status=vp_set_status,
    reset=vp_reset,
    find_vqs=vp_find_vqs,
    del_vqs=vp_del_vqs,
    get_features=vp_get_features,
    finalize_features=vp_finalize_features,
    bus_name=vp_bus_name,
    set_vq_affinity=vp_set_vq_affinity,
)


def virtio_pci_legacy_probe(vdev: VirtioPciDevice) -> None:
    """The legacy transport: the I/O BAR's registers (ENODEV without an I/O BAR)."""
    if not vdev.pci_dev.io_bar:
        raise OSError(19, "virtio_pci: no legacy I/O BAR")
    vdev.config = virtio_pci_config_ops
    vdev.ioaddr = vdev.pci_dev.io_bar
    vdev.isr = vdev.ioaddr + VIRTIO_PCI_ISR
    vdev.setup_vq, vdev.del_vq, vdev.config_vector = setup_vq, del_vq, vp_config_vector
    vdev.transport = "legacy"
