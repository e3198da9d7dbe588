"""The vCPU as the guest sees it: instructions that trap to KVM, and interrupt entry.

Every port access, MMIO access to a device BAR or the IOAPIC, HLT and the MSR writes (the
TSC deadline, the x2APIC EOI) is a VM exit: the record goes to KVM and this CPU stops until
KVM enters it again. The entry may carry the one vector KVM injects; it is delivered through
the IDT at once, or, if it came while a handler runs (IF=0 in a hardirq), when that handler
returns (iret).

KVM makes a running vCPU exit with the IPI of kvm_vcpu_kick: a signal to this process (and
its kick semaphore). The signal handler runs at the next bytecode boundary of the vCPU's
thread and takes the VM exit there, so KVM injects at once; the vector it brings is delivered
through the IDT at the next point where the interrupted code can take it (an exit of its
own, ``interrupt_window``, HLT), as an interrupt waits for IF=1. A signal that comes while
the vCPU is in an exit is left to the exit's end: KVM injects at that entry, or, if it kicked
as it entered, the kick semaphore is still up and the vCPU takes the exit then.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

from common import kvm_abi
from common.channel import Channel
from common.cpus import Gate
from common.notifier import EventNotifier


class GuestShutdown(Exception):
    """KVM tore the VM down (or the run ended) while this CPU was stopped in an exit."""


class VCpu:
    def __init__(self, exit_ch: Channel, entry_ch: Channel, kick: EventNotifier) -> None:
        self._send = exit_ch.send_raw
        self._recv = entry_ch.recv_raw
        self._kick_sem = kick.sem
        self.idt: dict[int, Callable[[int], None]] = {}
        self.pending: list[int] = []
        self.irq_exit: Callable[[], None] = lambda: None
        self.exits = 0
        self.need_resched = False
        self._in_irq = False
        self._in_exit = True  # until the first VM entry
        self._io_cache: dict[tuple[int, int, int], bytes] = {}
        self.gate = Gate("vCPU 0")
        self.ipis = 0
        if threading.current_thread() is threading.main_thread():
            signal.signal(kvm_abi.SIG_VCPU_KICK, self._ipi)

    def power_on(self) -> bool:
        """Wait for the first VM entry (QEMU's first KVM_RUN); False if the VM went first."""
        first = self._recv(None)
        if first is None or kvm_abi.unpackb(first)[0] is None:
            return False
        self._in_exit = False
        return True

    # -- trapping instructions -----------------------------------------------------------------

    def _vmexit(self, record: bytes, deliver: bool = True) -> int:
        if self.gate.armed:
            self.gate.wait()
        self.exits += 1
        self._in_exit = True
        try:
            self._send(record)
            entry = self._recv(None)
        finally:
            self._in_exit = False
        if entry is None:
            raise GuestShutdown
        data, vectors = kvm_abi.unpackb(entry)
        if data is None:
            raise GuestShutdown
        if vectors:
            self.pending.append(vectors[0])
        if self._kick_sem.value > 0:  # an IPI that came as KVM entered us: take it now
            self._take_kick(False)
        if deliver and self.pending and not self._in_irq:
            self._deliver()
        return data

    def _out(self, size: int, port: int, value: int) -> None:
        key = (size, port, value)
        rec = self._io_cache.get(key)
        if rec is None:
            rec = kvm_abi.vmexit_io(False, size, port, value)
            if len(self._io_cache) < 256:
                self._io_cache[key] = rec
        self._vmexit(rec)

    def outb(self, value: int, port: int) -> None:
        self._out(1, port, value & 0xFF)

    def outw(self, value: int, port: int) -> None:
        self._out(2, port, value & 0xFFFF)

    def outl(self, value: int, port: int) -> None:
        self._out(4, port, value & 0xFFFFFFFF)

    def inb(self, port: int) -> int:
        return self._vmexit(kvm_abi.vmexit_io(True, 1, port)) & 0xFF

    def inw(self, port: int) -> int:
        return self._vmexit(kvm_abi.vmexit_io(True, 2, port)) & 0xFFFF

    def inl(self, port: int) -> int:
        return self._vmexit(kvm_abi.vmexit_io(True, 4, port)) & 0xFFFFFFFF

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        self._vmexit(kvm_abi.vmexit_mmio(gpa, size, True, value))

    def mmio_read(self, gpa: int, size: int) -> int:
        return self._vmexit(kvm_abi.vmexit_mmio(gpa, size, False))

    def wrmsr(self, msr: int, value: int) -> None:
        self._vmexit(kvm_abi.vmexit_wrmsr(msr, value))

    def apic_eoi(self) -> None:
        """The x2APIC EOI (native_apic_msr_eoi_write): a WRMSR that KVM intercepts."""
        self._vmexit(kvm_abi.VMEXIT_EOI)

    def hlt(self) -> None:
        """Stop until an interrupt arrives; it is delivered before hlt returns (one already
        taken and waiting for this boundary ends the halt at once)."""
        self._in_exit = True  # sti; hlt: a kick's signal from here on is left to KVM's entry
        if self.pending and not self._in_irq:
            self._in_exit = False
            self._deliver()
            return
        self._vmexit(kvm_abi.VMEXIT_HLT)

    def triple_fault(self) -> None:
        """The guest's way to shut the machine down: KVM reports KVM_EXIT_SHUTDOWN."""
        if self.gate.armed:
            self.gate.wait()
        self.exits += 1
        self._in_exit = True
        self._send(kvm_abi.VMEXIT_TRIPLE_FAULT)

    def interrupt_window(self) -> None:
        """An instruction boundary: take the exit a kick asked for, and deliver what came."""
        if self._kick_sem.value > 0:
            self._take_kick(True)
        elif self.pending and not self._in_irq:
            self._deliver()

    def _take_kick(self, deliver: bool) -> None:
        try:
            self._kick_sem.acquire(0)
        except Exception:  # another boundary consumed it first
            return
        self._vmexit(kvm_abi.VMEXIT_EXTERNAL_INTERRUPT, deliver)

    def _ipi(self, signum: int, frame: FrameType | None) -> None:
        """The kick's IPI: the VM exit now; the vector waits for the next boundary."""
        self.ipis += 1
        if not self._in_exit and not self.gate.armed:
            self._take_kick(False)

    # -- interrupt entry ----------------------------------------------------------------------

    def _deliver(self) -> None:
        """Interrupt entry through the IDT; a vector with no handler is acknowledged and
        dropped (Linux's "No irq handler for vector")."""
        self.need_resched = True
        self._in_irq = True
        try:
            while self.pending:
                vector = self.pending.pop(0)
                handler = self.idt.get(vector)
                if handler is None:
                    self.apic_eoi()
                else:
                    handler(vector)
        finally:
            self._in_irq = False
        self.irq_exit()
