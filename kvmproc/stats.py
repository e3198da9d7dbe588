"""KVM's per-VM and per-vCPU statistics, under the names kvm_stat shows."""

from __future__ import annotations

from common.kvm_abi import KVM_EXIT_NAMES

VCPU_STATS = (
    "exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "msr_exits",
    "irq_injections", "halt_wakeup", "signal_exits", "request_irq_exits",
    "ioeventfd_signals", "irqfd_signals", "signal_msis", "irq_lines",
)


class KvmStats:
    def __init__(self) -> None:
        self.vcpu = dict.fromkeys(VCPU_STATS, 0)
        self.userspace_exits = {name: 0 for name in KVM_EXIT_NAMES.values()}

    def as_dict(self) -> dict:
        return {"vcpu": dict(self.vcpu), "userspace_exits": dict(self.userspace_exits)}
