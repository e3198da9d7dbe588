"""Stands for hw/virtio/virtio-pci.c: virtio over PCI; the proxy and the legacy (I/O BAR)
interface (the virtio 1.0 interface is in ``virtio_pci_modern``).

``disable-legacy``/``disable-modern`` choose the interfaces: legacy alone (the seed's path),
modern alone (device id 0x1041, revision 1), or both (transitional: device id 0x1000, the
legacy BAR and the modern capabilities; the driver picks). The legacy BAR's registers are
served by ``virtio_pci_config_read`` / ``virtio_pci_config_write`` (QEMU's
virtio_ioport_read / virtio_ioport_write). When the driver sets DRIVER_OK the proxy
registers a KVM ioeventfd for each queue's notify: port BAR0+16 with datamatch = queue index
(legacy), and the queue's address in the notify region, any length (modern).
``virtio_pci_notify`` raises an interrupt in the calling thread (the main loop's, for
virtio-net in user space): ``msix_notify`` (KVM_SIGNAL_MSI) or ``pci_set_irq`` with the ISR's
bit (KVM_IRQ_LINE_STATUS); reading the ISR lowers the line. Guest notifiers (an irqfd per
vector, ``virtio_pci_set_guest_notifiers``) are for the devices whose interrupts do not come
from QEMU's threads (vhost, dataplane); QEMU's own virtio-net does not set them.
"""

from __future__ import annotations

from typing import Any

from common.eventfd import EventfdNotifier, poll_bridge
from common.ipc import RunConfig
from common.notifier import EventNotifier, PollBridge
from common.trace import trace_event, traced
from common.virtio_abi import (
    PCI_DEVICE_ID_VIRTIO_NET,
    PCI_DEVICE_ID_VIRTIO_NET_MODERN,
    PCI_VENDOR_ID_REDHAT_QUMRANET,
    QEMU_VIRTIO_PCI_QUEUE_MEM_MULT,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    VIRTIO_MSI_CONFIG_VECTOR,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_MSI_QUEUE_VECTOR,
    VIRTIO_PCI_GUEST_FEATURES,
    VIRTIO_PCI_HOST_FEATURES,
    VIRTIO_PCI_ISR,
    VIRTIO_PCI_MODERN_BAR_SIZE,
    VIRTIO_PCI_MODERN_MEM_BAR,
    VIRTIO_PCI_QUEUE_ADDR_SHIFT,
    VIRTIO_PCI_QUEUE_NOTIFY,
    VIRTIO_PCI_QUEUE_NUM,
    VIRTIO_PCI_QUEUE_PFN,
    VIRTIO_PCI_QUEUE_SEL,
    VIRTIO_PCI_REGION_SIZE,
    VIRTIO_PCI_STATUS,
    virtio_pci_config_off,
)
from qemuproc.kvm_all import KVMState
from qemuproc.main_loop import MainLoop
from qemuproc.memory import (
    AddressSpace,
    MemoryRegion,
    MemoryRegionOps,
    memory_region_add_eventfd,
    memory_region_del_eventfd,
)
from qemuproc.pci import (
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCIDevice,
    PCIHostState,
)
from qemuproc.virtio import (
    VIRTIO_QUEUE_MAX,
    VirtIODevice,
    virtio_queue_guest_notifier_read,
    virtio_queue_host_notifier_read,
    virtio_queue_notify,
    virtio_queue_ready,
    virtio_queue_set_addr,
    virtio_reset,
    virtio_set_features,
    virtio_set_status,
)
from qemuproc.virtio_bus import (
    virtio_bus_set_host_notifier,
    virtio_bus_start_ioeventfd,
    virtio_bus_stop_ioeventfd,
)
from qemuproc.virtio_pci_modern import (
    VirtIOPCIQueue,
    modern_bar_regions,
    plug_modern_interface,
)

PCI_CLASS_NETWORK_ETHERNET = 0x020000
VIRTIO_PCI_IO_BASE = 0xC000
VIRTIO_PCI_MSIX_BAR_ADDR = 0xFEBF1000
VIRTIO_PCI_MODERN_BAR_ADDR = 0xFE000000
VIRTIO_PCI_IRQ_LINE = 11
VIRTIO_PCI_DEVFN = 3 << 3

trace_virtio_ioport_write = trace_event("virtio_ioport_write")


class VirtIOPCIProxy:
    def __init__(self, vdev: VirtIODevice, host: PCIHostState, io_as: AddressSpace,
                 mem_as: AddressSpace, kvm: KVMState, main_loop: MainLoop, cfg: RunConfig,
                 vectors: int, ioeventfd: bool, disable_legacy: bool = False,
                 disable_modern: bool = True) -> None:
        self.vdev = vdev
        self.legacy = not disable_legacy
        self.modern = not disable_modern
        self.kvm = kvm
        self.main_loop = main_loop
        self.cfg = cfg
        self.ioeventfd = ioeventfd
        self.ioeventfd_started = False
        self.ioeventfd_grabbed = 0  # back ends holding the host notifiers
        self.pci_dev = dev = PCIDevice("virtio-net-pci", VIRTIO_PCI_DEVFN,
                                       PCI_VENDOR_ID_REDHAT_QUMRANET, PCI_DEVICE_ID_VIRTIO_NET,
                                       PCI_CLASS_NETWORK_ETHERNET, PCI_VENDOR_ID_REDHAT_QUMRANET,
                                       VIRTIO_ID_NET, VIRTIO_PCI_IRQ_LINE)
        # the modern interface's state: feature selectors and each queue's registers
        self.dfselect = self.gfselect = 0
        self.guest_features = [0, 0]
        self.vqs = [VirtIOPCIQueue() for _ in range(VIRTIO_QUEUE_MAX)]
        self.common, self.isr, self.device, self.notify = modern_bar_regions()
        self.modern_mem_bar_idx = VIRTIO_PCI_MODERN_MEM_BAR
        self.modern_bar_addr = VIRTIO_PCI_MODERN_BAR_ADDR
        self.config_cap = 0
        if self.modern:  # virtio_pci_pre_plugged
            vdev.host_features |= 1 << VIRTIO_F_VERSION_1
        self.bar = MemoryRegion("virtio-pci", VIRTIO_PCI_REGION_SIZE, MemoryRegionOps(
            virtio_pci_config_read, virtio_pci_config_write), self)
        if self.legacy:
            dev.set_bar(0, VIRTIO_PCI_IO_BASE, is_io=True, size=VIRTIO_PCI_REGION_SIZE)
            io_as.add_subregion(VIRTIO_PCI_IO_BASE, self.bar)
        else:  # pure virtio-1.0
            dev.config[2:4] = PCI_DEVICE_ID_VIRTIO_NET_MODERN.to_bytes(2, "little")
            dev.config[8] = 1
        if self.modern:
            plug_modern_interface(self, mem_as)
            dev.set_bar(VIRTIO_PCI_MODERN_MEM_BAR, VIRTIO_PCI_MODERN_BAR_ADDR, is_io=False,
                        size=VIRTIO_PCI_MODERN_BAR_SIZE,
                        type_bits=PCI_BASE_ADDRESS_MEM_PREFETCH | PCI_BASE_ADDRESS_MEM_TYPE_64)
        if vectors:
            dev.set_bar(1, VIRTIO_PCI_MSIX_BAR_ADDR, is_io=False, size=0x1000)
            dev.msix_init(vectors, 1)
            mem_as.add_subregion(VIRTIO_PCI_MSIX_BAR_ADDR, dev.msix_mmio_region())
            dev.msi_send = kvm.kvm_irqchip_send_msi
        dev.intx_set_irq = kvm.kvm_set_irq
        host.pci_register(dev)
        vdev.notify_vector = self.virtio_pci_notify
        self.host_bridges: dict[int, PollBridge] = {}
        self.irqfd_gsis: dict[int, int] = {}  # vector -> gsi
        self.irqfd_msgs: dict[int, tuple[int, int]] = {}  # vector -> its route's message
        self.irqfds: dict[int, Any] = {}
        self.guest_notifiers: dict[int, Any] = {}  # INTx with vhost: queue -> notifier
        self.eventfd_notifiers = False  # a vhost-user back end: host and guest notifiers are
        self.vhost_host_notifiers: dict[int, EventfdNotifier] = {}  # real eventfds

    # -- notifications toward the guest -------------------------------------------------------

    @traced
    def virtio_pci_notify(self, vector: int) -> None:
        dev = self.pci_dev
        if dev.msix_enabled():
            if vector != VIRTIO_MSI_NO_VECTOR:
                dev.msix_notify(vector)
        else:
            dev.pci_set_irq(self.vdev.isr & 1)

    def virtio_pci_vector_unmask(self, vector: int, msg: tuple[int, int]) -> None:
        """The guest unmasked a vector whose interrupts go to an irqfd: if its message
        changed, the MSI route follows (kvm_virtio_pci_vq_vector_unmask ->
        kvm_irqchip_update_msi_route)."""
        gsi = self.irqfd_gsis.get(vector)
        if gsi is not None and self.irqfd_msgs.get(vector) != msg:
            self.irqfd_msgs[vector] = msg
            self.kvm.kvm_irqchip_update_msi_route(gsi, *msg)
            self.kvm.kvm_irqchip_commit_routes()

    def virtio_pci_vector_mask(self, vector: int) -> None:
        """Masked: the route stays (see the deviation on masked notifiers)."""

    # -- DRIVER_OK: ioeventfds and irqfds ------------------------------------------------------

    def virtio_pci_ioeventfd_assign(self, notifier: str, n: int, assign: bool) -> None:
        """Queue ``n``'s kick registers: the modern notify address (any length, no
        datamatch: KVM_CAP_IOEVENTFD_ANY_LENGTH) and the legacy QUEUE_NOTIFY port."""
        if self.modern:
            mr = self.notify.mr
            assert mr is not None
            addr = QEMU_VIRTIO_PCI_QUEUE_MEM_MULT * n
            if assign:
                memory_region_add_eventfd(mr, addr, 0, False, n, notifier)
            else:
                memory_region_del_eventfd(mr, addr, 0, False, n, notifier)
        if self.legacy:
            if assign:
                memory_region_add_eventfd(self.bar, VIRTIO_PCI_QUEUE_NOTIFY, 2, True, n, notifier)
            else:
                memory_region_del_eventfd(self.bar, VIRTIO_PCI_QUEUE_NOTIFY, 2, True, n, notifier)

    def virtio_pci_set_vector(self, old: int, new: int) -> int:
        """A queue's or the configuration's vector changes from ``old`` to ``new``:
        msix_vector_unuse, then msix_vector_use, which refuses a vector past the table
        (the driver reads back VIRTIO_MSI_NO_VECTOR)."""
        if not self.pci_dev.msix_entries_nr:
            return VIRTIO_MSI_NO_VECTOR
        self.pci_dev.msix_vector_unuse(old)
        return new if self.pci_dev.msix_vector_use(new) == 0 else VIRTIO_MSI_NO_VECTOR

    # -- the bus's hooks (virtio_bus.VirtioBus) --------------------------------------------------

    def ioeventfd_enabled(self) -> bool:
        """virtio_pci_ioeventfd_enabled: ``ioeventfd=on``."""
        return self.ioeventfd

    def ioeventfd_assign(self, n: int, assign: bool) -> None:
        """k->ioeventfd_assign, on queue ``n``'s host notifier (named by the run; while a
        vhost-user back end holds the notifiers, the real eventfd it kicks through, closed
        when it lets go: virtio_bus_cleanup_host_notifier)."""
        if self.eventfd_notifiers and self.ioeventfd_grabbed:
            self.virtio_pci_ioeventfd_assign(self.vhost_host_notifier_name(n), n, assign)
            if not assign:
                self.virtio_pci_release_host_notifiers(range(n, n + 1))
        else:
            self.virtio_pci_ioeventfd_assign(self.cfg.ioeventfd(n), n, assign)
        self.vdev.vq[n].host_notifier_enabled = assign  # virtio_queue_set_host_notifier_enabled

    def start_ioeventfd(self) -> None:
        """virtio_device_start_ioeventfd_impl: every ready queue's kick becomes an ioeventfd
        that QEMU's main loop reads, and each is kicked once, for what the driver queued."""
        for vq in self.vdev.vq:
            if not virtio_queue_ready(vq):
                continue
            n = vq.queue_index
            bridge = PollBridge(EventNotifier(self.cfg.ioeventfd(n)))
            self.host_bridges[n] = bridge
            self.kvm.eventfd_fds[bridge.notifier.name] = bridge.fileno()
            virtio_bus_set_host_notifier(self, n, True)
            vq.host_notifier = bridge
            self.main_loop.qemu_set_fd_handler(bridge.fileno(),
                                               lambda q: virtio_queue_host_notifier_read(q),
                                               None, vq, f"ioeventfd:{vq.name}")
        for bridge in self.host_bridges.values():
            bridge.set()

    def stop_ioeventfd(self) -> None:
        """virtio_device_stop_ioeventfd_impl: the kicks reach the vCPU thread again; one
        still pending is handled now (virtio_bus_cleanup_host_notifier)."""
        for n, bridge in self.host_bridges.items():
            self.main_loop.qemu_set_fd_handler(bridge.fileno(), None, None, None)
            virtio_bus_set_host_notifier(self, n, False)
            vq = self.vdev.vq[n]
            vq.host_notifier = None
            if bridge.test_and_clear():
                virtio_queue_notify(self.vdev, n)
            bridge.stop()
        self.host_bridges.clear()

    @traced
    def virtio_pci_start_ioeventfd(self) -> None:
        virtio_bus_start_ioeventfd(self)

    @traced
    def virtio_pci_stop_ioeventfd(self) -> None:
        virtio_bus_stop_ioeventfd(self)

    @traced
    def virtio_pci_set_guest_notifiers(self, assign: bool) -> None:
        """What vhost_net_start does for a vhost back end (not called for virtio-net in user
        space): with MSI-X each vector in use gets an irqfd (with_irqfd:
        kvm_virtio_pci_vector_use), so the kernel's signal goes straight to KVM; without, each
        queue's guest notifier is an eventfd QEMU's main loop reads
        (virtio_queue_guest_notifier_read), raising INTx as its own device would."""
        kvm = self.kvm
        for vector, gsi in self.irqfd_gsis.items():
            kvm.kvm_irqchip_remove_irqfd_notifier_gsi(gsi)
            kvm.kvm_irqchip_release_virq(gsi)
            self.irqfds.pop(vector).close()
        self.irqfd_gsis.clear()
        self.irqfd_msgs.clear()
        self.pci_dev.msix_vector_use_notifier = None  # msix_unset_vector_notifiers
        self.pci_dev.msix_vector_release_notifier = None
        for n, bridge in self.guest_notifiers.items():
            self.main_loop.qemu_set_fd_handler(bridge.fileno(), None, None, None)
            virtio_queue_guest_notifier_read(self.vdev.vq[n])  # ..._fd_handler(vq, false)
            self.vdev.vq[n].guest_notifier = None
            bridge.stop()
        self.guest_notifiers.clear()
        if not assign:
            return
        dev = self.pci_dev
        if not dev.msix_enabled():
            for vq in self.vdev.vq:
                if vq.views is None:
                    continue
                bridge = poll_bridge(EventfdNotifier() if self.eventfd_notifiers
                                     else EventNotifier(self.cfg.irqfd(vq.queue_index)))
                self.guest_notifiers[vq.queue_index] = vq.guest_notifier = bridge
                self.main_loop.qemu_set_fd_handler(bridge.fileno(),
                                                   virtio_queue_guest_notifier_read, None, vq,
                                                   f"guest-notifier:{vq.name}")
            return
        vectors = {self.vdev.config_vector} | {vq.vector for vq in self.vdev.vq}
        vectors.discard(VIRTIO_MSI_NO_VECTOR)
        for vector in sorted(vectors):
            msg = dev.msix_get_message(vector)
            self.irqfd_gsis[vector] = kvm.kvm_irqchip_add_msi_route(dev.name, vector, *msg)
            self.irqfd_msgs[vector] = msg
        kvm.kvm_irqchip_commit_routes()
        for vector, gsi in self.irqfd_gsis.items():
            n = (EventfdNotifier() if self.eventfd_notifiers
                 else EventNotifier(self.cfg.irqfd(vector)))
            self.irqfds[vector] = n
            kvm.kvm_irqchip_add_irqfd_notifier_gsi(n.name, gsi)
        dev.msix_vector_use_notifier = self.virtio_pci_vector_unmask  # msix_set_vector_notifiers
        dev.msix_vector_release_notifier = self.virtio_pci_vector_mask

    def queue_call_notifier_name(self, queue: int) -> str | None:
        """The eventfd a vhost queue signals (VHOST_SET_VRING_CALL): its vector's irqfd, or
        under INTx its guest notifier."""
        if queue in self.guest_notifiers:
            return self.guest_notifiers[queue].notifier.name
        irqfd = self.irqfds.get(self.vdev.vq[queue].vector)
        return irqfd.name if irqfd is not None else None

    def vhost_host_notifier(self, queue: int) -> Any:
        """The kick a vhost back end takes (virtio_queue_get_host_notifier): for vhost-user a
        real eventfd, made the first time it is asked for, signalled from the start as
        virtio_bus_set_host_notifier makes it (event_notifier_init(notifier, 1)), so that the
        back end looks at what the ring already holds; else the ioeventfd's name."""
        if not self.eventfd_notifiers:
            return self.cfg.ioeventfd(queue)
        n = self.vhost_host_notifiers.get(queue)
        if n is None:
            n = self.vhost_host_notifiers[queue] = EventfdNotifier(initval=1)
        return n

    def vhost_host_notifier_name(self, queue: int) -> str:
        n = self.vhost_host_notifier(queue)
        return n if isinstance(n, str) else n.name

    def virtio_pci_release_host_notifiers(self, queues: range) -> None:
        """virtio_bus_cleanup_host_notifier: vhost gave the queues back; their eventfds go."""
        for q in queues:
            n = self.vhost_host_notifiers.pop(q, None)
            if n is not None:
                n.close()

    def vhost_guest_notifier(self, queue: int) -> Any:
        """The call a vhost back end signals: the eventfd (vhost-user) or name (kernel) of the
        queue's vector's irqfd, or under INTx of its guest notifier."""
        if not self.eventfd_notifiers:
            return self.queue_call_notifier_name(queue)
        if queue in self.guest_notifiers:
            return self.guest_notifiers[queue].notifier
        return self.irqfds.get(self.vdev.vq[queue].vector)

    def virtio_pci_reset(self) -> None:
        """virtio_bus_reset (QEMU's ioeventfds stop, virtio_reset: a vhost back end stops
        through the device's status 0), then the proxy's own registers."""
        virtio_bus_stop_ioeventfd(self)
        virtio_reset(self.vdev)
        self.pci_dev.msix_unuse_all_vectors()
        self.pci_dev.pci_set_irq(0)
        for q in self.vqs:
            q.reset()

    def describe(self) -> dict[str, Any]:
        return {"ioeventfds": {self.vdev.vq[n].name: b.notifier.name
                               for n, b in self.host_bridges.items()},
                "irqfds": {f"msix vector {v}": f"gsi {g}" for v, g in self.irqfd_gsis.items()},
                "guest_notifiers": {self.vdev.vq[n].name: b.notifier.name
                                    for n, b in self.guest_notifiers.items()},
                "msis_sent": self.pci_dev.msis_sent, "msis_lost": self.kvm.msis_lost,
                "msis_masked": self.pci_dev.msis_masked, "intx_level": self.pci_dev.irq_level,
                "msix_enabled": self.pci_dev.msix_enabled()}


@traced
def virtio_ioport_write(proxy: VirtIOPCIProxy, addr: int, val: int) -> None:
    vdev = proxy.vdev
    if trace_virtio_ioport_write.on:
        trace_virtio_ioport_write(addr=addr, val=val)
    if addr == VIRTIO_PCI_GUEST_FEATURES:
        virtio_set_features(vdev, val)
    elif addr == VIRTIO_PCI_QUEUE_PFN:
        pa = val << VIRTIO_PCI_QUEUE_ADDR_SHIFT
        if pa == 0:
            proxy.virtio_pci_reset()
        elif vdev.queue_sel < len(vdev.vq):
            virtio_queue_set_addr(vdev, vdev.queue_sel, pa)
    elif addr == VIRTIO_PCI_QUEUE_SEL:
        if val < VIRTIO_QUEUE_MAX:
            vdev.queue_sel = val
    elif addr == VIRTIO_PCI_QUEUE_NOTIFY:
        if val < VIRTIO_QUEUE_MAX:
            virtio_queue_notify(vdev, val)
    elif addr == VIRTIO_PCI_STATUS:
        if not val & VIRTIO_CONFIG_S_DRIVER_OK:
            proxy.virtio_pci_stop_ioeventfd()
        virtio_set_status(vdev, val & 0xFF)
        if val & VIRTIO_CONFIG_S_DRIVER_OK:
            proxy.virtio_pci_start_ioeventfd()
        if vdev.status == 0:
            proxy.virtio_pci_reset()
    elif addr == VIRTIO_MSI_CONFIG_VECTOR:
        vdev.config_vector = proxy.virtio_pci_set_vector(vdev.config_vector, val)
    elif addr == VIRTIO_MSI_QUEUE_VECTOR:
        if vdev.queue_sel < len(vdev.vq):
            vq = vdev.vq[vdev.queue_sel]
            vq.vector = proxy.virtio_pci_set_vector(vq.vector, val)


def virtio_ioport_read(proxy: VirtIOPCIProxy, addr: int) -> int:
    vdev = proxy.vdev
    sel = vdev.queue_sel
    vq = vdev.vq[sel] if sel < len(vdev.vq) else None
    if addr == VIRTIO_PCI_HOST_FEATURES:
        return vdev.host_features & 0xFFFFFFFF
    if addr == VIRTIO_PCI_GUEST_FEATURES:
        return vdev.guest_features & 0xFFFFFFFF
    if addr == VIRTIO_PCI_QUEUE_PFN:
        return (vq.desc >> VIRTIO_PCI_QUEUE_ADDR_SHIFT) if vq else 0
    if addr == VIRTIO_PCI_QUEUE_NUM:
        return vq.num if vq else 0
    if addr == VIRTIO_PCI_QUEUE_SEL:
        return sel
    if addr == VIRTIO_PCI_STATUS:
        return vdev.status
    if addr == VIRTIO_PCI_ISR:
        ret = vdev.isr  # reading the ISR also clears it, and lowers the INTx line
        vdev.isr = 0
        proxy.pci_dev.pci_set_irq(0)
        return ret
    if addr == VIRTIO_MSI_CONFIG_VECTOR:
        return vdev.config_vector
    if addr == VIRTIO_MSI_QUEUE_VECTOR:
        return vq.vector if vq else VIRTIO_MSI_NO_VECTOR
    return 0xFFFFFFFF


def virtio_pci_config_read(proxy: VirtIOPCIProxy, addr: int, size: int) -> int:
    config = virtio_pci_config_off(proxy.pci_dev.msix_enabled())
    if addr < config:
        return virtio_ioport_read(proxy, addr) & ((1 << (8 * size)) - 1)
    data = proxy.vdev.get_config()
    off = addr - config
    return int.from_bytes(data[off : off + size].ljust(size, b"\xff"), "little")


@traced
def virtio_pci_config_write(proxy: VirtIOPCIProxy, addr: int, val: int, size: int) -> None:
    config = virtio_pci_config_off(proxy.pci_dev.msix_enabled())
    if addr < config:
        virtio_ioport_write(proxy, addr, val)
        return
    off = addr - config
    data = bytearray(proxy.vdev.get_config())
    if off + size <= len(data):
        data[off : off + size] = val.to_bytes(size, "little")
        proxy.vdev.set_config(bytes(data))

