"""Stands for virt/kvm/kvm_main.c: the VM and its ioctls, as QEMU reaches them.

QEMU's vCPU thread sends KVM_RUN on the vCPU channel; any QEMU thread sends VM ioctls
(KVM_IOEVENTFD, KVM_IRQFD, KVM_SET_GSI_ROUTING, KVM_SIGNAL_MSI, KVM_IRQ_LINE_STATUS, ...) on
the VM channel and reads the result.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from common.channel import Channel
from common.cpus import SIG_IPI
from common.eventfd import is_eventfd_name
from common.ipc import RunConfig
from common.kvm_abi import (
    KVM_DESTROY_VM,
    KVM_GET_STATS,
    KVM_IOEVENTFD,
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQ_LINE_STATUS,
    KVM_IRQFD,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_RUN,
    KVM_RUN_MMAP,
    KVM_SET_GSI_ROUTING,
    KVM_SIGNAL_MSI,
    KVM_USERSPACE_IRQ_SOURCE_ID,
    SIG_VCPU_KICK,
    VCPU_PID_FILE,
    VM_CHANNEL_SYNC,
)
from common.notifier import EventNotifier
from kvmproc.eventfd import IoeventfdBus, IrqfdTable
from kvmproc.ioapic import KvmIoapic
from kvmproc.irqchip import IrqRouting
from kvmproc.lapic import MODE_NAMES, KvmLapic
from kvmproc.stats import KvmStats
from kvmproc.vcpu import KvmVcpu

EINVAL = 22
ENOENT = 2


class Kvm:
    """struct kvm with its one vCPU."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.stats = KvmStats()
        self.lapic = KvmLapic(EventNotifier(cfg.kick))
        self.ioapic = KvmIoapic(self.lapic)
        self.routing = IrqRouting(self.lapic, self.ioapic)
        self.bus = IoeventfdBus(self.stats)
        self.irqfds = IrqfdTable(self.routing, self.stats)
        self.vcpu = KvmVcpu(Channel(cfg.channel("guest_exit")),
                            Channel(cfg.channel("guest_entry")), self.lapic, self.ioapic,
                            self.bus, self.stats)
        self.destroyed = False
        self.allowed_names = set(cfg.semaphores())
        self.vcpu_pidfd = -1
        self.lapic.send_ipi = self.smp_send_reschedule

    def smp_send_reschedule(self) -> None:
        """The IPI to the CPU in guest mode: the guest process, which says its pid at boot
        (held as a pidfd, so a pid reused after the guest died is never signalled)."""
        if self.vcpu_pidfd < 0:
            try:
                pid = int((Path(self.cfg.rundir) / VCPU_PID_FILE).read_text())
                self.vcpu_pidfd = os.pidfd_open(pid)
            except (OSError, ValueError):
                return
        try:
            signal.pidfd_send_signal(self.vcpu_pidfd, SIG_VCPU_KICK)
        except OSError:
            pass

    def kvm_vcpu_ioctl(self, req: list) -> list:
        if req[0] == KVM_RUN:
            return self.vcpu.kvm_arch_vcpu_ioctl_run(req[1] or 0)
        if req[0] == KVM_RUN_MMAP:  # a new QEMU maps kvm_run: the exit still to complete
            return [KVM_RUN_MMAP, self.vcpu.last_exit, req[1] if len(req) > 1 else None]
        return [-EINVAL]

    def name_allowed(self, name: str) -> bool:
        """The run's own semaphores, or a real eventfd of the caller's (checked when taken)."""
        return name in self.allowed_names or is_eventfd_name(name)

    def kvm_vm_ioctl(self, req: list) -> list:
        """Serve one VM ioctl; the reply is [ret, payload]."""
        op = req[0]
        if op == KVM_SIGNAL_MSI:
            self.stats.vcpu["signal_msis"] += 1
            return [self.routing.kvm_send_userspace_msi(req[1], req[2]), None]
        if op == KVM_IRQ_LINE_STATUS:  # kvm_vm_ioctl_irq_line
            self.stats.vcpu["irq_lines"] += 1
            status = self.routing.kvm_set_irq(req[1], req[2], KVM_USERSPACE_IRQ_SOURCE_ID)
            return [0, status]
        if op == KVM_IOEVENTFD:
            _, addr, length, datamatch, flags, name = req
            is_pio = bool(flags & KVM_IOEVENTFD_FLAG_PIO)
            dm = datamatch if flags & KVM_IOEVENTFD_FLAG_DATAMATCH else None
            if flags & KVM_IOEVENTFD_FLAG_DEASSIGN:
                ok = self.bus.kvm_deassign_ioeventfd(is_pio, addr, length, dm)
                return [0 if ok else -ENOENT, None]
            if not self.name_allowed(name) or length not in (0, 1, 2, 4, 8) \
                    or (not length and dm is not None):  # no length: no datamatch either
                return [-EINVAL, None]
            try:
                self.bus.kvm_assign_ioeventfd(is_pio, addr, length, dm, name)
            except OSError as e:  # an eventfd name that is no eventfd of a live process
                return [-(e.errno or EINVAL), None]
            return [0, None]
        if op == KVM_IRQFD:
            _, gsi, flags, name = req
            if flags & KVM_IRQFD_FLAG_DEASSIGN:
                return [0 if self.irqfds.kvm_irqfd_deassign(gsi) else -ENOENT, None]
            if not self.name_allowed(name):
                return [-EINVAL, None]
            try:
                self.irqfds.kvm_irqfd_assign(gsi, name)
            except OSError as e:
                return [-(e.errno or EINVAL), None]
            return [0, None]
        if op == KVM_SET_GSI_ROUTING:
            self.routing.kvm_set_irq_routing(req[1])
            return [0, None]
        if op == KVM_GET_STATS:
            return [0, self.describe()]
        if op == VM_CHANNEL_SYNC:
            return [0, req[1]]
        if op == SIG_IPI:
            self.vcpu.kvm_vcpu_signal()
            return [0, None]
        if op == KVM_DESTROY_VM:
            self.destroyed = True
            return [0, None]
        return [-EINVAL, None]

    def describe(self) -> dict:
        return {
            **self.stats.as_dict(),
            "vcpu_mode": MODE_NAMES[self.lapic.mode],
            "lapic": self.lapic.describe(),
            "eois": self.lapic.eois,
            "ioapic": self.ioapic.describe(),
            "ipis": self.lapic.ipis,
            "apic_timer_fires": self.lapic.timer_fires,
            "ioeventfds": self.bus.describe(),
            "irqfds": self.irqfds.describe(),
        }
