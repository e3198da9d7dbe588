"""The vCPU as the guest sees it: instructions that trap to KVM, and interrupt entry.

Every port access, MMIO access to a device BAR, HLT and the TSC-deadline MSR write is a VM
exit: the record goes to KVM and this CPU stops until KVM enters it again. The entry may
carry vectors that KVM injects; they are delivered through the IDT when interrupts are
enabled (IF=1), otherwise held in the local APIC's IRR until ``sti``.

KVM makes a running vCPU exit by signalling its kick semaphore (the IPI of kvm_vcpu_kick);
the CPU notices at the next instruction boundary (``interrupt_window``).
"""

from __future__ import annotations

from collections.abc import Callable

from common import kvm_abi
from common.channel import Channel
from common.cpus import Gate
from common.notifier import EventNotifier

MSR_IA32_TSC_DEADLINE = 0x6E0
EXIT_REASON_MSR_WRITE = 32


class GuestShutdown(Exception):
    """KVM tore the VM down (or the run ended) while this CPU was stopped in an exit."""


class VCpu:
    def __init__(self, exit_ch: Channel, entry_ch: Channel, kick: EventNotifier) -> None:
        self._send = exit_ch.send_raw
        self._recv = entry_ch.recv_raw
        self._kick_sem = kick.sem
        self.idt: dict[int, Callable[[int], None]] = {}
        self.if_flag = True
        self.irr: list[int] = []
        self.irq_exit: Callable[[], None] = lambda: None
        self.exits = 0
        self.need_resched = False
        self._in_irq = False
        self._io_cache: dict[tuple[int, int, int], bytes] = {}
        self.gate = Gate("vCPU 0")

    # -- trapping instructions -----------------------------------------------------------------

    def _vmexit(self, record: bytes) -> int:
        if self.gate.armed:
            self.gate.wait()
        self.exits += 1
        self._send(record)
        entry = self._recv(None)
        if entry is None:
            raise GuestShutdown
        data, vectors = kvm_abi.unpackb(entry)
        if data is None:
            raise GuestShutdown
        if vectors:
            self._accept(vectors)
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
        self._vmexit(kvm_abi.packb([EXIT_REASON_MSR_WRITE, msr, value]))

    def hlt(self) -> None:
        """Stop until an interrupt arrives; it is delivered before hlt returns."""
        self._vmexit(kvm_abi.VMEXIT_HLT)

    def triple_fault(self) -> None:
        """The guest's way to shut the machine down: KVM reports KVM_EXIT_SHUTDOWN."""
        if self.gate.armed:
            self.gate.wait()
        self.exits += 1
        self._send(kvm_abi.VMEXIT_TRIPLE_FAULT)

    def interrupt_window(self) -> None:
        """An instruction boundary: take the exit a kick asked for, and the interrupts it brings."""
        if self._kick_sem.value > 0:
            try:
                self._kick_sem.acquire(0)
            except Exception:  # another boundary consumed it first
                return
            self._vmexit(kvm_abi.VMEXIT_EXTERNAL_INTERRUPT)

    # -- interrupt entry ----------------------------------------------------------------------

    def _accept(self, vectors: list[int]) -> None:
        self.irr.extend(vectors)
        if self.if_flag and not self._in_irq:
            self._deliver()

    def _deliver(self) -> None:
        self.need_resched = True
        self._in_irq = True
        try:
            while self.irr:
                vector = self.irr.pop(0)
                handler = self.idt.get(vector)
                if handler is not None:
                    handler(vector)
        finally:
            self._in_irq = False
        self.irq_exit()

    def cli(self) -> None:
        self.if_flag = False

    def sti(self) -> None:
        self.if_flag = True
        if self.irr and not self._in_irq:
            self._deliver()
