"""Stands for arch/x86/kvm/x86.c and vmx/vmx.c: the vCPU run loop and VM-exit handling.

``kvm_arch_vcpu_ioctl_run`` serves one KVM_RUN from QEMU's vCPU thread:

    for (;;) { vcpu_enter_guest: inject pending interrupts, enter, run, exit;
               r = handle_exit(); if (r <= 0) break; }

``handle_exit`` dispatches on the VMX exit reason. A handler returning 1 means "handled in
the kernel, re-enter the guest" (ioeventfd writes, HLT, external interrupts, the APIC timer
MSR); 0 means "fill in kvm_run and return to user space" (port I/O nobody in the kernel
claims, MMIO, shutdown).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from common import kvm_abi
from common.channel import Channel
from common.cpus import Gate
from common.kvm_abi import (
    EXIT_REASON_EPT_VIOLATION,
    EXIT_REASON_EXTERNAL_INTERRUPT,
    EXIT_REASON_HLT,
    EXIT_REASON_IO_INSTRUCTION,
    EXIT_REASON_TRIPLE_FAULT,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_EXIT_NAMES,
    KVM_EXIT_SHUTDOWN,
    VMENTRY_PLAIN,
    VMX_EXIT_REASONS,
)
from common.trace import trace_event, traced
from kvmproc.eventfd import IoeventfdBus
from kvmproc.lapic import IN_GUEST_MODE, OUTSIDE_GUEST_MODE, KvmLapic
from kvmproc.stats import KvmStats

EXIT_REASON_MSR_WRITE = 32
MSR_IA32_TSC_DEADLINE = 0x6E0

trace_kvm_entry = trace_event("kvm_entry")
trace_kvm_exit = trace_event("kvm_exit")
trace_kvm_pio = trace_event("kvm_pio")
trace_kvm_mmio = trace_event("kvm_mmio")
trace_kvm_inj_virq = trace_event("kvm_inj_virq")
trace_kvm_userspace_exit = trace_event("kvm_userspace_exit")

ExitResult = tuple[int, list | None]


class KvmVcpu:
    def __init__(self, guest_exit: Channel, guest_entry: Channel, lapic: KvmLapic,
                 bus: IoeventfdBus, stats: KvmStats) -> None:
        self._recv = guest_exit.recv_raw
        self._send = guest_entry.send_raw
        self.lapic = lapic
        self.bus = bus
        self.stats = stats
        self.vcpu_stats = stats.vcpu
        self.complete_userspace_io = False
        self.last_exit: list | None = None
        self.gate = Gate("vcpu0", "vcpu0")
        self.signal_pending = False
        self.handlers: dict[int, Callable[[list], ExitResult]] = {
            EXIT_REASON_IO_INSTRUCTION: self.handle_io,
            EXIT_REASON_HLT: self.handle_halt,
            EXIT_REASON_EXTERNAL_INTERRUPT: self.handle_external_interrupt,
            EXIT_REASON_EPT_VIOLATION: self.handle_ept_violation,
            EXIT_REASON_TRIPLE_FAULT: self.handle_triple_fault,
            EXIT_REASON_MSR_WRITE: self.handle_wrmsr,
        }

    @traced
    def kvm_arch_vcpu_ioctl_run(self, data: int) -> list:
        """Run the guest until an exit needs user space; return that kvm_run exit."""
        entry_data = data if self.complete_userspace_io else 0
        self.complete_userspace_io = False
        while True:
            r, run_exit = self.vcpu_enter_guest(entry_data)
            entry_data = 0
            if r > 0 and self.signal_pending:
                self.signal_pending = False
                self.vcpu_stats["signal_exits"] += 1
                r, run_exit = 0, [KVM_EXIT_INTR]
            if r <= 0:
                assert run_exit is not None
                self.stats.userspace_exits[KVM_EXIT_NAMES[run_exit[0]]] += 1
                if trace_kvm_userspace_exit.on:
                    trace_kvm_userspace_exit(reason=KVM_EXIT_NAMES[run_exit[0]])
                self.last_exit = run_exit
                return run_exit

    def kvm_vcpu_signal(self) -> None:
        """A signal for the thread in KVM_RUN (QEMU's SIG_IPI): the guest is kicked out, and
        KVM_RUN returns KVM_EXIT_INTR once the exit in progress is handled."""
        self.signal_pending = True
        with self.lapic.lock:
            self.lapic._kvm_vcpu_kick()

    def vcpu_enter_guest(self, data: int) -> ExitResult:
        """Inject what is pending, enter the guest, run it until it exits, handle the exit."""
        if self.gate.armed:
            self.gate.wait()
        lapic = self.lapic
        with lapic.lock:
            vectors = lapic.take_pending() if lapic.irr else None
            lapic.mode = IN_GUEST_MODE
        if vectors:
            self.vcpu_stats["irq_injections"] += len(vectors)
            if trace_kvm_inj_virq.on:
                trace_kvm_inj_virq(vectors=vectors)
        self.kvm_guest_enter(data, vectors)
        rec = self.kvm_guest_exit()
        return self.handle_exit(rec)

    def kvm_guest_enter(self, data: int, vectors: list[int] | None) -> None:
        """VM entry: the guest CPU resumes (with IN data and injected vectors, if any)."""
        if trace_kvm_entry.on:
            trace_kvm_entry(vcpu=0)
        self._send(VMENTRY_PLAIN if not (data or vectors) else
                   kvm_abi.vmentry(data, vectors or []))

    def kvm_guest_exit(self) -> list:
        """The guest runs until its next VM exit; back in the host, read why it exited."""
        raw = self._recv(None)
        lapic = self.lapic
        with lapic.lock:
            lapic.mode = OUTSIDE_GUEST_MODE
        lapic.kick.test_and_clear()  # an IPI sent for this entry is moot now
        rec = kvm_abi.unpackb(raw)
        self.vcpu_stats["exits"] += 1
        if trace_kvm_exit.on:
            trace_kvm_exit(reason=VMX_EXIT_REASONS.get(rec[0], rec[0]))
        return rec

    @traced
    def handle_exit(self, rec: list) -> ExitResult:
        handler = self.handlers.get(rec[0])
        if handler is None:
            return 0, [kvm_abi.KVM_EXIT_UNKNOWN]
        return handler(rec)

    # -- exit handlers ----------------------------------------------------------------------

    def handle_io(self, rec: list) -> ExitResult:
        _, is_in, size, port, value = rec
        self.vcpu_stats["io_exits"] += 1
        if trace_kvm_pio.on:
            trace_kvm_pio(rw="read" if is_in else "write", port=port, size=size, val=value)
        if not is_in and self.bus.ioeventfd_write(True, port, size, value):
            return 1, None  # kvm_fast_pio: an ioeventfd took it; straight back into the guest
        self.complete_userspace_io = bool(is_in)
        return 0, [KVM_EXIT_IO, KVM_EXIT_IO_IN if is_in else KVM_EXIT_IO_OUT, size, port, 1,
                   value]

    def handle_ept_violation(self, rec: list) -> ExitResult:
        _, gpa, length, is_write, value = rec
        self.vcpu_stats["mmio_exits"] += 1
        if trace_kvm_mmio.on:
            trace_kvm_mmio(rw="write" if is_write else "read", gpa=gpa, len=length, val=value)
        if is_write and self.bus.ioeventfd_write(False, gpa, length, value):
            return 1, None
        self.complete_userspace_io = not is_write
        return 0, [KVM_EXIT_MMIO, gpa, length, is_write, value]

    def handle_halt(self, rec: list) -> ExitResult:
        """kvm_emulate_halt: the vCPU blocks in the kernel until an interrupt is pending."""
        self.vcpu_stats["halt_exits"] += 1
        lapic = self.lapic
        with lapic.lock:
            if not lapic.irr:
                self.vcpu_stats["halt_wakeup"] += 1
                lapic.kvm_vcpu_block()
        return 1, None

    def handle_external_interrupt(self, rec: list) -> ExitResult:
        self.vcpu_stats["irq_exits"] += 1
        return 1, None

    def handle_wrmsr(self, rec: list) -> ExitResult:
        _, msr, value = rec
        self.vcpu_stats["msr_exits"] += 1
        if msr == MSR_IA32_TSC_DEADLINE:
            self.lapic.kvm_set_lapic_tscdeadline_msr(value, time.monotonic_ns())
        return 1, None

    def handle_triple_fault(self, rec: list) -> ExitResult:
        return 0, [KVM_EXIT_SHUTDOWN]
