"""Stands for arch/x86/kvm/lapic.c: the in-kernel local APIC of the one vCPU.

Interrupts are accepted into the IRR (``kvm_apic_set_irq`` -> ``__apic_accept_irq``) from any
thread (the VM ioctl thread's KVM_SIGNAL_MSI, irqfd waiters, the IOAPIC, the APIC timer);
``kvm_vcpu_kick`` then gets them to the vCPU wherever it is: a halted vCPU is woken, a vCPU
in guest mode is sent an IPI (the kick semaphore) so that it exits, and a vCPU outside guest
mode will find them at its next entry.

At an entry KVM injects one vector: the highest in the IRR whose priority class is above
the processor priority (the highest class in service), and moves it from IRR to ISR
(``kvm_get_apic_interrupt``). It stays in service until the guest's EOI (an x2APIC MSR write,
``apic_set_eoi``); a level-triggered vector (TMR set) is then broadcast to the IOAPIC.
IRR, ISR and TMR are 256-bit maps, as the APIC's registers are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from common.kvm_abi import APIC_DM_FIXED, APIC_TRIG_LEVEL, LOCAL_TIMER_VECTOR
from common.notifier import EventNotifier
from common.trace import trace_event

OUTSIDE_GUEST_MODE = 0
IN_GUEST_MODE = 1
EXITING_GUEST_MODE = 2
HALTED = 3

MODE_NAMES = {OUTSIDE_GUEST_MODE: "outside guest mode (in KVM or QEMU)",
              IN_GUEST_MODE: "running guest code", EXITING_GUEST_MODE: "exiting guest mode",
              HALTED: "halted"}
APIC_ID = 0

trace_kvm_apic_accept_irq = trace_event("kvm_apic_accept_irq")
trace_kvm_eoi = trace_event("kvm_eoi")
trace_kvm_vcpu_wakeup = trace_event("kvm_vcpu_wakeup")


def vectors_of(bitmap: int) -> list[int]:
    """The vectors set in a 256-bit register, highest first."""
    out = []
    while bitmap:
        v = bitmap.bit_length() - 1
        out.append(v)
        bitmap &= ~(1 << v)
    return out


class KvmLapic:
    def __init__(self, kick: EventNotifier) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.mode = OUTSIDE_GUEST_MODE
        self.kick = kick
        self.ipis = 0
        self.eois = 0
        self.timer: threading.Thread | None = None
        self.timer_cond = threading.Condition()
        self.timer_stopped = False
        self.tsc_deadline = 0
        self.timer_fires = 0
        self.ioapic_eoi: Callable[[int], None] = lambda vector: None
        self.nmi_pending = False
        self.send_ipi: Callable[[], None] = lambda: None

    def kvm_apic_set_irq(self, vector: int, trig_mode: int = 0,
                         delivery_mode: int = APIC_DM_FIXED) -> None:
        """__apic_accept_irq for a fixed interrupt: set it in the IRR (an edge interrupt
        already pending coalesces), record its trigger mode in the TMR, kick the vCPU."""
        bit = 1 << vector
        with self.lock:
            self.irr |= bit
            if trig_mode == APIC_TRIG_LEVEL:
                self.tmr |= bit
            else:
                self.tmr &= ~bit
            if trace_kvm_apic_accept_irq.on:
                trace_kvm_apic_accept_irq(apicid=APIC_ID, dm=delivery_mode, tm=trig_mode,
                                          vec=vector)
            self._kvm_vcpu_kick()

    def _kvm_vcpu_kick(self) -> None:
        if self.mode == IN_GUEST_MODE:
            self.mode = EXITING_GUEST_MODE  # one IPI per entry is enough
            self.ipis += 1
            self.kick.set()
            self.send_ipi()
        elif self.mode == HALTED:
            self.wake.notify()

    def kvm_vcpu_kick(self) -> None:
        with self.lock:
            self._kvm_vcpu_kick()

    def kvm_apic_has_interrupt(self) -> int:
        """apic_has_interrupt_for_ppr: the highest IRR vector above the processor priority,
        or -1 (caller holds lock)."""
        if not self.irr:
            return -1
        vector = self.irr.bit_length() - 1
        ppr = (self.isr.bit_length() - 1) & 0xF0 if self.isr else 0
        return vector if (vector & 0xF0) > ppr else -1

    def kvm_inject_nmi(self) -> None:
        """KVM_NMI: an NMI goes past the IRR and the priorities, at the next entry."""
        with self.lock:
            self.nmi_pending = True
            self._kvm_vcpu_kick()

    def kvm_vcpu_has_events(self) -> bool:
        """An NMI or an interrupt the vCPU can take now (caller holds lock)."""
        return self.nmi_pending or self.kvm_apic_has_interrupt() >= 0

    def kvm_get_apic_interrupt(self) -> int:
        """The vector to inject at this entry, moved from IRR to ISR; -1 if none (caller
        holds lock)."""
        vector = self.kvm_apic_has_interrupt()
        if vector >= 0:
            bit = 1 << vector
            self.irr &= ~bit
            self.isr |= bit
        return vector

    def apic_set_eoi(self) -> int:
        """The guest's EOI: the highest vector in service leaves the ISR; a level-triggered
        one is broadcast to the IOAPIC (kvm_ioapic_send_eoi). Returns it (-1: none)."""
        with self.lock:
            if not self.isr:
                return -1
            vector = self.isr.bit_length() - 1
            bit = 1 << vector
            self.isr &= ~bit
            level = bool(self.tmr & bit)
            self.eois += 1
            if trace_kvm_eoi.on:
                trace_kvm_eoi(apicid=APIC_ID, vector=vector)
        if level:
            self.ioapic_eoi(vector)
        return vector

    def kvm_vcpu_block(self, signal_pending: Callable[[], bool]) -> bool:
        """The halted vCPU sleeps until an interrupt can be injected or a signal is pending
        (caller holds lock). True if an interrupt woke it (the vCPU leaves the halt)."""
        start = time.monotonic_ns()
        self.mode = HALTED
        while not self.kvm_vcpu_has_events() and not signal_pending():
            self.wake.wait()
        self.mode = OUTSIDE_GUEST_MODE
        woken = self.kvm_vcpu_has_events()
        if trace_kvm_vcpu_wakeup.on:
            trace_kvm_vcpu_wakeup(ns=time.monotonic_ns() - start, waited=True, valid=woken)
        return woken

    def describe(self) -> dict:
        return {"irr": vectors_of(self.irr), "isr": vectors_of(self.isr),
                "tmr": vectors_of(self.tmr)}

    # -- the APIC timer in TSC-deadline mode ----------------------------------------------------

    def kvm_set_lapic_tscdeadline_msr(self, deadline_ns: int, now_ns: int) -> None:
        """Arm (or, with 0, cancel) the timer: its hrtimer is the one timer thread's wait."""
        with self.timer_cond:
            self.tsc_deadline = deadline_ns
            if self.timer is None and deadline_ns:
                self.timer = threading.Thread(target=self._apic_timer_fn, name="apic-timer",
                                              daemon=True)
                self.timer.start()
            self.timer_cond.notify()

    def _apic_timer_fn(self) -> None:
        """apic_timer_fn when the deadline passes: the timer vector becomes pending."""
        cond = self.timer_cond
        while True:
            with cond:
                while True:
                    if self.timer_stopped:
                        return
                    deadline = self.tsc_deadline
                    if deadline:
                        left = (deadline - time.monotonic_ns()) / 1e9
                        if left <= 0:
                            self.tsc_deadline = 0
                            break
                        cond.wait(left)
                    else:
                        cond.wait()
            self.timer_fires += 1
            self.kvm_apic_set_irq(LOCAL_TIMER_VECTOR)

    def timer_armed(self) -> bool:
        return bool(self.tsc_deadline)

    def stop(self) -> None:
        with self.timer_cond:
            self.timer_stopped = True
            self.timer_cond.notify()
