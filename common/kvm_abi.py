"""Stands for include/uapi/linux/kvm.h and the VMX exit reasons: what crosses KVM's edges.

Two kinds of exit, as on real hardware:

* a VM exit (guest CPU -> KVM): the VMX basic exit reason the guest's trapping instruction
  caused (``EXIT_REASON_IO_INSTRUCTION``, ``EXIT_REASON_HLT``, ...), sent by guestproc;
* a userspace exit (KVM -> QEMU): ``kvm_run->exit_reason`` (``KVM_EXIT_IO``, ...) when
  ``KVM_RUN`` returns because KVM could not handle the VM exit itself.

Records are msgpack arrays; the field order is given beside each constructor.
"""

from __future__ import annotations

import signal

import msgpack

# VMX basic exit reasons (arch/x86/include/uapi/asm/vmx.h)
EXIT_REASON_EXTERNAL_INTERRUPT = 1
EXIT_REASON_TRIPLE_FAULT = 2
EXIT_REASON_HLT = 12
EXIT_REASON_IO_INSTRUCTION = 30
EXIT_REASON_MSR_WRITE = 32
EXIT_REASON_EPT_VIOLATION = 48

VMX_EXIT_REASONS = {
    EXIT_REASON_EXTERNAL_INTERRUPT: "EXTERNAL_INTERRUPT",
    EXIT_REASON_TRIPLE_FAULT: "TRIPLE_FAULT",
    EXIT_REASON_HLT: "HLT",
    EXIT_REASON_IO_INSTRUCTION: "IO_INSTRUCTION",
    EXIT_REASON_MSR_WRITE: "MSR_WRITE",
    EXIT_REASON_EPT_VIOLATION: "EPT_VIOLATION",
}

# MSRs the guest writes (asm/msr-index.h, asm/apicdef.h): the TSC deadline, and the x2APIC's
# EOI register (APIC_EOI 0xB0 at APIC_BASE_MSR 0x800 + 0xB0 >> 4)
MSR_IA32_TSC_DEADLINE = 0x6E0
APIC_BASE_MSR = 0x800
APIC_EOI = 0xB0
MSR_X2APIC_EOI = APIC_BASE_MSR + (APIC_EOI >> 4)

# interrupt vectors (asm/irq_vectors.h) and delivery (asm/apicdef.h, asm/io_apic.h)
ISA_IRQ_VECTOR_BASE = 0x30
"""ISA_IRQ_VECTOR(irq): the vector of a legacy line (here the IOAPIC pin's vector)."""
LOCAL_TIMER_VECTOR = 0xEC
APIC_DM_FIXED = 0x000
APIC_TRIG_EDGE = 0
APIC_TRIG_LEVEL = 1
MSI_ADDR_BASE = 0xFEE00000
"""An MSI's address: the local APIC's window; the destination APIC id is in bits 12-19."""

# the IOAPIC (arch/x86/kvm/ioapic.h): MMIO window, registers, redirection-table entry bits
IOAPIC_DEFAULT_BASE_ADDRESS = 0xFEC00000
IOAPIC_MEM_LENGTH = 0x100
IOAPIC_REG_SELECT = 0x00
IOAPIC_REG_WINDOW = 0x10
IOAPIC_REG_VERSION = 0x01
IOAPIC_REDIR_TABLE_BASE = 0x10
IOAPIC_NUM_PINS = 24
IOAPIC_VERSION_ID = 0x11
IOAPIC_RTE_VECTOR_MASK = 0xFF
IOAPIC_RTE_POLARITY = 1 << 13
IOAPIC_RTE_REMOTE_IRR = 1 << 14
IOAPIC_RTE_TRIG_MODE = 1 << 15
IOAPIC_RTE_MASKED = 1 << 16

# GSI routing (KVM_SET_GSI_ROUTING entry types; the irqchip an IRQCHIP route names)
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_IOAPIC = 2
KVM_USERSPACE_IRQ_SOURCE_ID = 0

# kvm_run->exit_reason
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_INTR = 10

KVM_EXIT_NAMES = {
    KVM_EXIT_UNKNOWN: "KVM_EXIT_UNKNOWN",
    KVM_EXIT_IO: "KVM_EXIT_IO",
    KVM_EXIT_HLT: "KVM_EXIT_HLT",
    KVM_EXIT_MMIO: "KVM_EXIT_MMIO",
    KVM_EXIT_SHUTDOWN: "KVM_EXIT_SHUTDOWN",
    KVM_EXIT_INTR: "KVM_EXIT_INTR",
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# vCPU and VM ioctls, by name in the records
KVM_RUN = "KVM_RUN"
KVM_IOEVENTFD = "KVM_IOEVENTFD"
KVM_IRQFD = "KVM_IRQFD"
KVM_SET_GSI_ROUTING = "KVM_SET_GSI_ROUTING"
KVM_IOCTL_NR = {
    KVM_RUN: 0xAE80,  # _IO(KVMIO, 0x80)
    KVM_IOEVENTFD: 0x4040AE79,  # _IOW(KVMIO, 0x79, struct kvm_ioeventfd)
    KVM_IRQFD: 0x4020AE76,  # _IOW(KVMIO, 0x76, struct kvm_irqfd)
    KVM_SET_GSI_ROUTING: 0x4008AE6A,  # _IOW(KVMIO, 0x6a, struct kvm_irq_routing)
    "KVM_SIGNAL_MSI": 0x4020AEA5,  # _IOW(KVMIO, 0xa5, struct kvm_msi)
    "KVM_IRQ_LINE_STATUS": 0xC008AE67,  # _IOWR(KVMIO, 0x67, struct kvm_irq_level)
}
"""The request numbers of the ioctls that have one (what QEMU's kvm_vm_ioctl trace prints)."""
KVM_SIGNAL_MSI = "KVM_SIGNAL_MSI"
"""[KVM_SIGNAL_MSI, address, data]: inject one MSI now (struct kvm_msi)."""
KVM_IRQ_LINE_STATUS = "KVM_IRQ_LINE_STATUS"
"""[KVM_IRQ_LINE_STATUS, irq, level]: set a GSI's line level (struct kvm_irq_level); the
reply's payload is the status (1 delivered, 0 coalesced, -1 masked)."""
KVM_GET_STATS = "KVM_GET_STATS"
KVM_DESTROY_VM = "KVM_DESTROY_VM"

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

packb = msgpack.Packer(use_bin_type=True).pack


def unpackb(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, use_list=True)


# -- guest CPU -> KVM (VM exits) -----------------------------------------------------------------


def vmexit_io(is_in: bool, size: int, port: int, data: int = 0) -> bytes:
    """[EXIT_REASON_IO_INSTRUCTION, is_in, size, port, data]"""
    return packb([EXIT_REASON_IO_INSTRUCTION, int(is_in), size, port, data])


def vmexit_mmio(gpa: int, length: int, is_write: bool, data: int = 0) -> bytes:
    """[EXIT_REASON_EPT_VIOLATION, gpa, len, is_write, data]"""
    return packb([EXIT_REASON_EPT_VIOLATION, gpa, length, int(is_write), data])


def vmexit_wrmsr(msr: int, value: int) -> bytes:
    """[EXIT_REASON_MSR_WRITE, msr, value]"""
    return packb([EXIT_REASON_MSR_WRITE, msr, value])


VMEXIT_HLT = packb([EXIT_REASON_HLT])
VMEXIT_EOI = vmexit_wrmsr(MSR_X2APIC_EOI, 0)
VMEXIT_EXTERNAL_INTERRUPT = packb([EXIT_REASON_EXTERNAL_INTERRUPT])
VMEXIT_TRIPLE_FAULT = packb([EXIT_REASON_TRIPLE_FAULT])

# -- KVM -> guest CPU (VM entries): [data for a pending IN or MMIO read, [injected vector]] ----

VMENTRY_PLAIN = packb([0, []])
SIG_VCPU_KICK = signal.SIGUSR2
"""The IPI kvm_vcpu_kick sends to the CPU running the guest: a signal to the guest process,
whose vCPU takes the VM exit at once (besides the kick semaphore it polls)."""
VCPU_PID_FILE = "vcpu0.pid"
"""Where in the run directory the guest's vCPU (its process) says who it is, for the IPI."""
NMI_VECTOR = 2
"""The vector KVM_NMI injects and the guest's IDT takes it at (asm/irq_vectors.h)."""


def vmentry(data: int, vectors: list[int]) -> bytes:
    return packb([data, vectors])


# -- QEMU <-> KVM ---------------------------------------------------------------------------------


def kvm_run(data: int = 0) -> bytes:
    """[KVM_RUN, data]: run the vCPU; ``data`` completes a pending KVM_EXIT_IO IN / MMIO read."""
    return packb([KVM_RUN, data])


def exit_io(direction: int, size: int, port: int, count: int, data: int) -> list:
    """[KVM_EXIT_IO, direction, size, port, count, data]"""
    return [KVM_EXIT_IO, direction, size, port, count, data]


def exit_mmio(phys_addr: int, length: int, is_write: bool, data: int) -> list:
    """[KVM_EXIT_MMIO, phys_addr, len, is_write, data]"""
    return [KVM_EXIT_MMIO, phys_addr, length, int(is_write), data]


# -- a QEMU restarted on a running VM (qemuproc/cpr.py) ------------------------------------------

KVM_RUN_MMAP = "KVM_RUN_MMAP"
"""vCPU channel: [KVM_RUN_MMAP, token] -> [KVM_RUN_MMAP, last exit or None, token].

Stands for the new QEMU's mmap() of the vCPU fd: kvm_run still holds the exit that KVM_RUN
last returned, which the next KVM_RUN completes. Served in order with KVM_RUN, so every exit
sent before the reply belongs to the dead QEMU's KVM_RUN, and the reply says which exit is
still to be handled; the token tells this QEMU's reply from one that a QEMU which died while
recovering never read."""

VM_CHANNEL_SYNC = "VM_CHANNEL_SYNC"
"""VM channel: [VM_CHANNEL_SYNC, token] -> [0, token]. No KVM counterpart (an ioctl cannot
outlive its caller): it lets a new QEMU skip the replies to a dead QEMU's last VM ioctls."""
