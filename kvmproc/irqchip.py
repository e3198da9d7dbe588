"""Stands for virt/kvm/irqchip.c and arch/x86/kvm/irq_comm.c: GSI routing.

A GSI routes either to an MSI (the message data carries the vector: ``kvm_set_msi``) or to
an IOAPIC pin (a line interrupt, delivered at ISA vector 0x30 + pin).
"""

from __future__ import annotations

from common.trace import trace_event
from kvmproc.lapic import KvmLapic

ISA_IRQ_VECTOR_BASE = 0x30
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2

trace_kvm_set_irq = trace_event("kvm_set_irq")
trace_kvm_msi_set_irq = trace_event("kvm_msi_set_irq")


class IrqRouting:
    def __init__(self, lapic: KvmLapic) -> None:
        self.lapic = lapic
        self.routes: dict[int, tuple[int, int]] = {}  # gsi -> (type, vector or pin)

    def kvm_set_irq_routing(self, entries: list[list[int]]) -> None:
        """Each entry: [gsi, type, msi data or irqchip pin]."""
        self.routes = {gsi: (kind, value) for gsi, kind, value in entries}

    def kvm_set_irq(self, gsi: int) -> bool:
        route = self.routes.get(gsi)
        if route is None:
            return False
        kind, value = route
        if kind == KVM_IRQ_ROUTING_MSI:
            if trace_kvm_msi_set_irq.on:
                trace_kvm_msi_set_irq(gsi=gsi, vector=value)
            self.lapic.kvm_apic_set_irq(value & 0xFF)
        else:
            if trace_kvm_set_irq.on:
                trace_kvm_set_irq(gsi=gsi, pin=value)
            self.lapic.kvm_apic_set_irq(ISA_IRQ_VECTOR_BASE + value)
        return True
