"""Stands for virt/kvm/irqchip.c and arch/x86/kvm/irq_comm.c: GSI routing and MSI delivery.

A GSI routes either to an MSI (``kvm_set_msi``: the message's data carries the vector, its
address the destination) or to an IOAPIC pin (``kvm_set_ioapic_irq``). Until QEMU commits a
table, GSIs 0-23 go to the IOAPIC pin of that number (kvm_setup_default_irq_routing).
``kvm_send_userspace_msi`` is KVM_SIGNAL_MSI: an MSI user space sends without a route.
"""

from __future__ import annotations

from common.kvm_abi import (
    APIC_DM_FIXED,
    APIC_TRIG_EDGE,
    APIC_TRIG_LEVEL,
    IOAPIC_NUM_PINS,
    KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
    MSI_ADDR_BASE,
)
from common.trace import trace_event
from kvmproc.ioapic import KvmIoapic
from kvmproc.lapic import APIC_ID, KvmLapic

MSI_DATA_VECTOR_MASK = 0xFF
MSI_DATA_DELIVERY_MODE_MASK = 0x700
MSI_DATA_TRIGGER_LEVEL = 1 << 15
MSI_ADDR_DEST_ID_SHIFT = 12

trace_kvm_set_irq = trace_event("kvm_set_irq")
trace_kvm_msi_set_irq = trace_event("kvm_msi_set_irq")

Route = tuple[int, int, int]
"""(type, MSI address or irqchip, MSI data or pin)."""


def default_routes() -> dict[int, Route]:
    return {gsi: (KVM_IRQ_ROUTING_IRQCHIP, 0, gsi) for gsi in range(IOAPIC_NUM_PINS)}


class IrqRouting:
    def __init__(self, lapic: KvmLapic, ioapic: KvmIoapic) -> None:
        self.lapic = lapic
        self.ioapic = ioapic
        self.routes: dict[int, Route] = default_routes()
        self.msis = 0

    def kvm_set_irq_routing(self, entries: list[list[int]]) -> None:
        """Each entry: [gsi, type, MSI address or irqchip, MSI data or pin]."""
        self.routes = {gsi: (kind, a, b) for gsi, kind, a, b in entries}

    def kvm_set_irq(self, gsi: int, level: int, irq_source_id: int = 0) -> int:
        """A GSI's line goes to ``level``: through its route to the IOAPIC or as an MSI.
        Returns < 0 if masked or unrouted, 0 if coalesced, > 0 if delivered."""
        if trace_kvm_set_irq.on:
            trace_kvm_set_irq(gsi=gsi, level=level, irq_source_id=irq_source_id)
        route = self.routes.get(gsi)
        if route is None:
            return -1
        kind, a, b = route
        if kind == KVM_IRQ_ROUTING_MSI:
            return self.kvm_set_msi(a, b) if level else -1
        return self.ioapic.kvm_ioapic_set_irq(b, level)

    def kvm_set_msi(self, address: int, data: int) -> int:
        """kvm_set_msi -> kvm_irq_delivery_to_apic: a fixed interrupt to the APIC the
        address names (the one vCPU's, APIC id 0; any other finds nobody)."""
        if trace_kvm_msi_set_irq.on:
            trace_kvm_msi_set_irq(address=address, data=data)
        if (address & 0xFFF00000) != MSI_ADDR_BASE \
                or (address >> MSI_ADDR_DEST_ID_SHIFT) & 0xFF != APIC_ID:
            return -1
        if data & MSI_DATA_DELIVERY_MODE_MASK != APIC_DM_FIXED:
            return -1
        self.msis += 1
        self.lapic.kvm_apic_set_irq(data & MSI_DATA_VECTOR_MASK,
                                    APIC_TRIG_LEVEL if data & MSI_DATA_TRIGGER_LEVEL
                                    else APIC_TRIG_EDGE, APIC_DM_FIXED)
        return 1

    def kvm_arch_set_irq_inatomic(self, gsi: int) -> int:
        """An irqfd's MSI, delivered from the wake-up itself: -EWOULDBLOCK (-11) if the
        GSI does not route to an MSI (the irqfd then injects through ``kvm_set_irq``)."""
        route = self.routes.get(gsi)
        if route is None or route[0] != KVM_IRQ_ROUTING_MSI:
            return -11
        if trace_kvm_set_irq.on:
            trace_kvm_set_irq(gsi=gsi, level=1, irq_source_id=0)
        return self.kvm_set_msi(route[1], route[2])

    def kvm_send_userspace_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI."""
        return self.kvm_set_msi(address, data)
