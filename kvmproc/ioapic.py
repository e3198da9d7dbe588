"""Stands for arch/x86/kvm/ioapic.c: the in-kernel IOAPIC, where INTx lines arrive.

The guest programs each pin's redirection-table entry through the MMIO window
(IOREGSEL / IOWIN at 0xFEC00000): vector, trigger mode, mask. ``kvm_ioapic_set_irq`` records a
line's level; a raised, unmasked line is sent to the local APIC (``ioapic_service``). A
level-triggered pin then sets Remote IRR and sends nothing more until the local APIC's EOI
for its vector comes back (``kvm_ioapic_update_eoi``): if the line is still up then, the
interrupt is sent again.
"""

from __future__ import annotations

import threading

from common.kvm_abi import (
    APIC_DM_FIXED,
    APIC_TRIG_EDGE,
    APIC_TRIG_LEVEL,
    IOAPIC_DEFAULT_BASE_ADDRESS,
    IOAPIC_MEM_LENGTH,
    IOAPIC_NUM_PINS,
    IOAPIC_REDIR_TABLE_BASE,
    IOAPIC_REG_SELECT,
    IOAPIC_REG_VERSION,
    IOAPIC_REG_WINDOW,
    IOAPIC_RTE_MASKED,
    IOAPIC_RTE_REMOTE_IRR,
    IOAPIC_RTE_TRIG_MODE,
    IOAPIC_RTE_VECTOR_MASK,
    IOAPIC_VERSION_ID,
)
from common.trace import trace_event
from kvmproc.lapic import KvmLapic

RTE_GUEST_BITS = ((1 << 64) - 1) & ~IOAPIC_RTE_REMOTE_IRR & ~(1 << 12)
"""What the guest may write: all but Remote IRR and Delivery Status, which are read-only."""

IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT = 10000
EOI_INJECT_DELAY_S = 0.01  # HZ / 100

trace_kvm_ioapic_set_irq = trace_event("kvm_ioapic_set_irq")
trace_kvm_ioapic_delayed_eoi_inj = trace_event("kvm_ioapic_delayed_eoi_inj")


class KvmIoapic:
    """struct kvm_ioapic: 24 pins, their redirection table and line levels (irr)."""

    base_address = IOAPIC_DEFAULT_BASE_ADDRESS

    def __init__(self, lapic: KvmLapic) -> None:
        self.lapic = lapic
        self.lock = threading.Lock()
        self.ioregsel = 0
        self.irr = 0
        self.redirtbl = [IOAPIC_RTE_MASKED] * IOAPIC_NUM_PINS
        self.sent = 0
        self.irq_eoi = [0] * IOAPIC_NUM_PINS
        self.delayed_eoi_injections = 0
        lapic.ioapic_eoi = self.kvm_ioapic_update_eoi

    def in_range(self, addr: int) -> bool:
        return self.base_address <= addr < self.base_address + IOAPIC_MEM_LENGTH

    # -- the guest's MMIO window ----------------------------------------------------------------

    def ioapic_mmio_write(self, addr: int, length: int, val: int) -> None:
        off = addr - self.base_address
        with self.lock:
            if off == IOAPIC_REG_SELECT:
                self.ioregsel = val & 0xFF
            elif off == IOAPIC_REG_WINDOW:
                self._ioapic_write_indirect(val & 0xFFFFFFFF)

    def ioapic_mmio_read(self, addr: int, length: int) -> int:
        off = addr - self.base_address
        with self.lock:
            if off == IOAPIC_REG_SELECT:
                return self.ioregsel
            if off == IOAPIC_REG_WINDOW:
                return self._ioapic_read_indirect()
        return 0

    def _ioapic_read_indirect(self) -> int:
        sel = self.ioregsel
        if sel == IOAPIC_REG_VERSION:
            return ((IOAPIC_NUM_PINS - 1) << 16) | IOAPIC_VERSION_ID
        pin = (sel - IOAPIC_REDIR_TABLE_BASE) >> 1
        if 0 <= pin < IOAPIC_NUM_PINS:
            e = self.redirtbl[pin]
            return (e >> 32) & 0xFFFFFFFF if sel & 1 else e & 0xFFFFFFFF
        return 0

    def _ioapic_write_indirect(self, val: int) -> None:
        pin = (self.ioregsel - IOAPIC_REDIR_TABLE_BASE) >> 1
        if not 0 <= pin < IOAPIC_NUM_PINS:
            return
        e = self.redirtbl[pin]
        if self.ioregsel & 1:
            new = (e & 0xFFFFFFFF) | (val << 32)
        else:
            new = (e & ~0xFFFFFFFF) | val
        new = (new & RTE_GUEST_BITS) | (e & ~RTE_GUEST_BITS)
        if not new & IOAPIC_RTE_TRIG_MODE:
            new &= ~IOAPIC_RTE_REMOTE_IRR  # an edge pin has no Remote IRR
        self.redirtbl[pin] = new
        if new & IOAPIC_RTE_TRIG_MODE and self.irr & (1 << pin) \
                and not new & (IOAPIC_RTE_MASKED | IOAPIC_RTE_REMOTE_IRR):
            self._ioapic_service(pin)  # unmasked with its line up and no EOI owed

    # -- lines ----------------------------------------------------------------------------------

    def kvm_ioapic_set_irq(self, pin: int, level: int) -> int:
        """Set ``pin``'s line level; 1 if an interrupt went to the local APIC, 0 if an edge
        line was already up (coalesced), -1 if masked or a level pin still owes its EOI
        (Remote IRR). The trace shows the entry as it was before."""
        if not 0 <= pin < IOAPIC_NUM_PINS:
            return -1
        with self.lock:
            e = self.redirtbl[pin]
            bit = 1 << pin
            old = self.irr
            if not level:
                self.irr &= ~bit
                ret = 1
            else:
                self.irr |= bit
                if not e & IOAPIC_RTE_TRIG_MODE and old == self.irr:
                    ret = 0
                else:
                    ret = self._ioapic_service(pin)
            if trace_kvm_ioapic_set_irq.on:
                trace_kvm_ioapic_set_irq(e=e, pin=pin, coalesced=ret == 0)
            return ret

    def _ioapic_service(self, pin: int) -> int:
        """Send ``pin``'s interrupt to the local APIC as its entry says (caller holds lock);
        -1 if masked, or level-triggered with Remote IRR set."""
        e = self.redirtbl[pin]
        level = bool(e & IOAPIC_RTE_TRIG_MODE)
        if e & IOAPIC_RTE_MASKED or (level and e & IOAPIC_RTE_REMOTE_IRR):
            return -1
        if level:
            self.redirtbl[pin] = e | IOAPIC_RTE_REMOTE_IRR
        self.sent += 1
        self.lapic.kvm_apic_set_irq(e & IOAPIC_RTE_VECTOR_MASK,
                                    APIC_TRIG_LEVEL if level else APIC_TRIG_EDGE, APIC_DM_FIXED)
        return 1

    def kvm_ioapic_update_eoi(self, vector: int) -> None:
        """The local APIC's EOI of a level-triggered ``vector``: clear Remote IRR of each pin
        on it, and send the interrupt again where the line is still up; after
        IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT such re-sends in a row (a storm) the next waits
        10 ms (``kvm_ioapic_eoi_inject_work``), as real hardware lets a buggy guest on."""
        with self.lock:
            for pin, e in enumerate(self.redirtbl):
                if (e & IOAPIC_RTE_VECTOR_MASK) != vector or not e & IOAPIC_RTE_TRIG_MODE:
                    continue
                self.redirtbl[pin] = e & ~IOAPIC_RTE_REMOTE_IRR
                if not e & IOAPIC_RTE_MASKED and self.irr & (1 << pin):
                    self.irq_eoi[pin] += 1
                    if self.irq_eoi[pin] == IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT:
                        self.irq_eoi[pin] = 0
                        self.delayed_eoi_injections += 1
                        if trace_kvm_ioapic_delayed_eoi_inj.on:
                            trace_kvm_ioapic_delayed_eoi_inj(e=self.redirtbl[pin])
                        t = threading.Timer(EOI_INJECT_DELAY_S, self.kvm_ioapic_eoi_inject_work)
                        t.daemon = True
                        t.start()
                    else:
                        self._ioapic_service(pin)
                else:
                    self.irq_eoi[pin] = 0

    def kvm_ioapic_eoi_inject_work(self) -> None:
        with self.lock:
            for pin, e in enumerate(self.redirtbl):
                if e & IOAPIC_RTE_TRIG_MODE and self.irr & (1 << pin) \
                        and not e & IOAPIC_RTE_REMOTE_IRR:
                    self._ioapic_service(pin)

    def describe(self) -> list[dict]:
        return [{"pin": pin, "vector": e & IOAPIC_RTE_VECTOR_MASK,
                 "trigger": "level" if e & IOAPIC_RTE_TRIG_MODE else "edge",
                 "masked": bool(e & IOAPIC_RTE_MASKED),
                 "remote_irr": bool(e & IOAPIC_RTE_REMOTE_IRR),
                 "line": (self.irr >> pin) & 1}
                for pin, e in enumerate(self.redirtbl)
                if not e & IOAPIC_RTE_MASKED or self.irr & (1 << pin)]
