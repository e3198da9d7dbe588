"""Stands for arch/x86/kvm/lapic.c: the in-kernel local APIC of the one vCPU.

Interrupts become pending in the IRR (``kvm_apic_set_irq``) from any thread (irqfd waiters,
the APIC timer); ``kvm_vcpu_kick`` then gets them to the vCPU wherever it is: a halted vCPU
is woken, a vCPU in guest mode is sent an IPI (the kick semaphore) so that it exits, and a
vCPU outside guest mode will find them at its next entry.
"""

from __future__ import annotations

import threading

from common.notifier import EventNotifier
from common.trace import trace_event

LOCAL_TIMER_VECTOR = 0xEC

OUTSIDE_GUEST_MODE = 0
IN_GUEST_MODE = 1
EXITING_GUEST_MODE = 2
HALTED = 3

MODE_NAMES = {OUTSIDE_GUEST_MODE: "outside guest mode (in KVM or QEMU)",
              IN_GUEST_MODE: "running guest code", EXITING_GUEST_MODE: "exiting guest mode",
              HALTED: "halted"}

trace_kvm_apic_accept_irq = trace_event("kvm_apic_accept_irq")
trace_kvm_vcpu_wakeup = trace_event("kvm_vcpu_wakeup")


class KvmLapic:
    def __init__(self, kick: EventNotifier) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.irr: list[int] = []
        self.mode = OUTSIDE_GUEST_MODE
        self.kick = kick
        self.ipis = 0
        self.timer: threading.Timer | None = None
        self.tsc_deadline = 0
        self.timer_fires = 0

    def kvm_apic_set_irq(self, vector: int) -> None:
        with self.lock:
            if vector not in self.irr:  # edge interrupts coalesce while pending
                self.irr.append(vector)
            if trace_kvm_apic_accept_irq.on:
                trace_kvm_apic_accept_irq(vector=vector, mode=self.mode)
            self._kvm_vcpu_kick()

    def _kvm_vcpu_kick(self) -> None:
        if self.mode == IN_GUEST_MODE:
            self.mode = EXITING_GUEST_MODE  # one IPI per entry is enough
            self.ipis += 1
            self.kick.set()
        elif self.mode == HALTED:
            self.wake.notify()

    def take_pending(self) -> list[int]:
        """inject_pending_event: the vectors to inject at this entry (caller holds lock)."""
        vectors = self.irr
        self.irr = []
        return vectors

    def kvm_vcpu_block(self) -> None:
        """The halted vCPU sleeps until an interrupt is pending (caller holds lock)."""
        self.mode = HALTED
        while not self.irr:
            self.wake.wait()
        if trace_kvm_vcpu_wakeup.on:
            trace_kvm_vcpu_wakeup(pending=list(self.irr))
        self.mode = OUTSIDE_GUEST_MODE

    # -- the APIC timer in TSC-deadline mode ----------------------------------------------------

    def kvm_set_lapic_tscdeadline_msr(self, deadline_ns: int, now_ns: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.tsc_deadline = deadline_ns
        if deadline_ns == 0:
            return
        delay = max(0.0, (deadline_ns - now_ns) / 1e9)
        self.timer = threading.Timer(delay, self._apic_timer_fn)
        self.timer.daemon = True
        self.timer.start()

    def _apic_timer_fn(self) -> None:
        self.timer_fires += 1
        self.kvm_apic_set_irq(LOCAL_TIMER_VECTOR)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
