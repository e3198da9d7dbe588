"""Stands for arch/x86/kvm/x86.c and vmx/vmx.c: the vCPU run loop and VM-exit handling.

``kvm_arch_vcpu_ioctl_run`` serves one KVM_RUN from QEMU's vCPU thread (vcpu_run):

    for (;;) { r = runnable ? vcpu_enter_guest()    /* inject, enter, run, exit, handle */
                            : vcpu_block();         /* halted: sleep for an interrupt */
               if (r <= 0) break;
               if (signal_pending(current)) { r = -EINTR; exit_reason = KVM_EXIT_INTR; break; } }

``handle_exit`` dispatches on the VMX exit reason. A handler returning 1 means "handled in
the kernel, re-enter the guest" (ioeventfd writes, the IOAPIC's MMIO, HLT, external
interrupts, the APIC timer and EOI MSRs); 0 means "fill in kvm_run and return to user space"
(port I/O nobody in the kernel claims, other MMIO, shutdown). HLT makes the vCPU halted
(``kvm_emulate_halt``); a signal (QEMU's SIG_IPI) ends the block with KVM_EXIT_INTR and the
vCPU stays halted for the next KVM_RUN.
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
    EXIT_REASON_MSR_WRITE,
    EXIT_REASON_TRIPLE_FAULT,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_EXIT_NAMES,
    KVM_EXIT_SHUTDOWN,
    MSR_IA32_TSC_DEADLINE,
    MSR_X2APIC_EOI,
    NMI_VECTOR,
    VMENTRY_PLAIN,
    VMX_EXIT_REASONS,
)
from common.trace import trace_event, traced
from kvmproc.eventfd import IoeventfdBus
from kvmproc.ioapic import KvmIoapic
from kvmproc.lapic import IN_GUEST_MODE, OUTSIDE_GUEST_MODE, KvmLapic
from kvmproc.stats import KvmStats

EINTR = 4
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3
KVM_PIO_IN = 0
KVM_PIO_OUT = 1
KVM_TRACE_MMIO_READ = 1
KVM_TRACE_MMIO_WRITE = 2
VCPU_ID = 0
KVM_ISA_VMX = 1

trace_kvm_entry = trace_event("kvm_entry")
trace_kvm_exit = trace_event("kvm_exit")
trace_kvm_pio = trace_event("kvm_pio")
trace_kvm_mmio = trace_event("kvm_mmio")
trace_kvm_msr = trace_event("kvm_msr")
trace_kvm_inj_virq = trace_event("kvm_inj_virq")
trace_kvm_userspace_exit = trace_event("kvm_userspace_exit")

ExitResult = tuple[int, list | None]


class KvmVcpu:
    def __init__(self, guest_exit: Channel, guest_entry: Channel, lapic: KvmLapic,
                 ioapic: KvmIoapic, bus: IoeventfdBus, stats: KvmStats) -> None:
        self._recv = guest_exit.recv_raw
        self._send = guest_entry.send_raw
        self.lapic = lapic
        self.ioapic = ioapic
        self.bus = bus
        self.mp_state = KVM_MP_STATE_RUNNABLE
        self.entry_data = 0  # a read's answer (user space's, or an in-kernel device's)
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
        if self.complete_userspace_io:
            self.entry_data = data
            self.complete_userspace_io = False
        errno = 0
        while True:
            if self.mp_state == KVM_MP_STATE_RUNNABLE:
                r, run_exit = self.vcpu_enter_guest()
            else:
                r, run_exit = self.vcpu_block()
            if r > 0 and self.signal_pending:  # kvm_xfer_to_guest_mode_handle_work
                self.signal_pending = False
                self.vcpu_stats["signal_exits"] += 1
                r, run_exit, errno = 0, [KVM_EXIT_INTR], -EINTR
            if r <= 0:
                assert run_exit is not None
                self.stats.userspace_exits[KVM_EXIT_NAMES[run_exit[0]]] += 1
                if trace_kvm_userspace_exit.on:
                    trace_kvm_userspace_exit(reason=run_exit[0], errno=errno)
                self.last_exit = run_exit
                return run_exit

    def kvm_vcpu_signal(self) -> None:
        """A signal for the thread in KVM_RUN (QEMU's SIG_IPI): the guest is kicked out (or
        the halted vCPU's block ends), and KVM_RUN returns KVM_EXIT_INTR."""
        with self.lapic.lock:
            self.signal_pending = True
            self.lapic._kvm_vcpu_kick()

    def vcpu_block(self) -> ExitResult:
        """The halted vCPU sleeps (kvm_vcpu_halt); an interrupt it can take makes it runnable
        again, a signal leaves it halted."""
        self.vcpu_stats["halt_wakeup"] += 1
        with self.lapic.lock:
            if self.lapic.kvm_vcpu_block(lambda: self.signal_pending):
                self.mp_state = KVM_MP_STATE_RUNNABLE
        return 1, None

    def vcpu_enter_guest(self) -> ExitResult:
        """Inject what is pending, enter the guest, run it until it exits, handle the exit;
        with a signal pending, no entry (kvm_vcpu_exit_request)."""
        if self.gate.armed:
            self.gate.wait()
        if self.signal_pending:
            return 1, None
        lapic = self.lapic
        with lapic.lock:
            if lapic.nmi_pending:
                lapic.nmi_pending = False
                vector = NMI_VECTOR
            else:
                vector = lapic.kvm_get_apic_interrupt() if lapic.irr else -1
            lapic.mode = IN_GUEST_MODE
        if vector > NMI_VECTOR:
            self.vcpu_stats["irq_injections"] += 1
            if trace_kvm_inj_virq.on:
                trace_kvm_inj_virq(irq=vector)
        data, self.entry_data = self.entry_data, 0
        self.kvm_guest_enter(data, vector)
        rec = self.kvm_guest_exit()
        return self.handle_exit(rec)

    def kvm_guest_enter(self, data: int, vector: int) -> None:
        """VM entry: the guest CPU resumes (with IN data and the injected vector, if any)."""
        if trace_kvm_entry.on:
            trace_kvm_entry(vcpu_id=VCPU_ID)
        self._send(VMENTRY_PLAIN if not data and vector < 0 else
                   kvm_abi.vmentry(data, [vector] if vector >= 0 else []))

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
            trace_kvm_exit(exit_reason=VMX_EXIT_REASONS.get(rec[0], rec[0]), vcpu_id=VCPU_ID,
                           isa=KVM_ISA_VMX)
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
            trace_kvm_pio(rw=KVM_PIO_IN if is_in else KVM_PIO_OUT, port=port, size=size,
                          count=1, val=value)
        if not is_in and self.bus.ioeventfd_write(True, port, size, value):
            return 1, None  # kvm_fast_pio: an ioeventfd took it; straight back into the guest
        self.complete_userspace_io = bool(is_in)
        return 0, [KVM_EXIT_IO, KVM_EXIT_IO_IN if is_in else KVM_EXIT_IO_OUT, size, port, 1,
                   value]

    def handle_ept_violation(self, rec: list) -> ExitResult:
        _, gpa, length, is_write, value = rec
        self.vcpu_stats["mmio_exits"] += 1
        if self.ioapic.in_range(gpa):  # an in-kernel device on the MMIO bus
            if is_write:
                self.ioapic.ioapic_mmio_write(gpa, length, value)
            else:
                value = self.entry_data = self.ioapic.ioapic_mmio_read(gpa, length)
            if trace_kvm_mmio.on:
                trace_kvm_mmio(type=KVM_TRACE_MMIO_WRITE if is_write else KVM_TRACE_MMIO_READ,
                               len=length, gpa=gpa, val=value)
            return 1, None
        if trace_kvm_mmio.on and is_write:
            trace_kvm_mmio(type=KVM_TRACE_MMIO_WRITE, len=length, gpa=gpa, val=value)
        if is_write and self.bus.ioeventfd_write(False, gpa, length, value):
            return 1, None
        self.complete_userspace_io = not is_write
        return 0, [KVM_EXIT_MMIO, gpa, length, is_write, value]

    def handle_halt(self, rec: list) -> ExitResult:
        """kvm_emulate_halt: halted unless an interrupt is ready; vcpu_run blocks it."""
        self.vcpu_stats["halt_exits"] += 1
        with self.lapic.lock:
            if not self.lapic.kvm_vcpu_has_events():
                self.mp_state = KVM_MP_STATE_HALTED
        return 1, None

    def handle_external_interrupt(self, rec: list) -> ExitResult:
        self.vcpu_stats["irq_exits"] += 1
        return 1, None

    def handle_wrmsr(self, rec: list) -> ExitResult:
        """kvm_emulate_wrmsr: the TSC deadline, or the x2APIC EOI (kvm_x2apic_msr_write)."""
        _, msr, value = rec
        self.vcpu_stats["msr_exits"] += 1
        if trace_kvm_msr.on:
            trace_kvm_msr(write=1, ecx=msr, data=value, exception=False)
        if msr == MSR_X2APIC_EOI:
            self.lapic.apic_set_eoi()
        elif msr == MSR_IA32_TSC_DEADLINE:
            self.lapic.kvm_set_lapic_tscdeadline_msr(value, time.monotonic_ns())
        return 1, None

    def handle_triple_fault(self, rec: list) -> ExitResult:
        return 0, [KVM_EXIT_SHUTDOWN]
