"""KVM's interrupt controllers (kvmproc/lapic.py, ioapic.py, irqchip.py) in one process:
the local APIC's priorities and EOI, the IOAPIC's level-triggered pins with Remote IRR, and
MSI delivery. The vCPU's kick is a real named semaphore, as in a run."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest

from common.kvm_abi import (
    IOAPIC_DEFAULT_BASE_ADDRESS,
    IOAPIC_REDIR_TABLE_BASE,
    IOAPIC_REG_SELECT,
    IOAPIC_REG_WINDOW,
    IOAPIC_RTE_MASKED,
    IOAPIC_RTE_REMOTE_IRR,
    IOAPIC_RTE_TRIG_MODE,
    KVM_IRQ_ROUTING_MSI,
    LOCAL_TIMER_VECTOR,
    MSI_ADDR_BASE,
)
from common.notifier import EventNotifier
from kvmproc import ioapic as ioapic_mod
from kvmproc.eventfd import Irqfd
from kvmproc.ioapic import KvmIoapic
from kvmproc.irqchip import IrqRouting
from kvmproc.lapic import IN_GUEST_MODE, KvmLapic
from kvmproc.stats import KvmStats

pytestmark = pytest.mark.usefixtures("no_leftovers")

PIN, VECTOR = 11, 0x3B


@pytest.fixture
def chip() -> Iterator[tuple[KvmLapic, KvmIoapic, IrqRouting]]:
    name = f"/vnr-test-kick-{secrets.token_hex(6)}"
    kick = EventNotifier(name, create=True)
    lapic = KvmLapic(kick)
    ioapic = KvmIoapic(lapic)
    try:
        yield lapic, ioapic, IrqRouting(lapic, ioapic)
    finally:
        lapic.stop()
        kick.close()
        EventNotifier.unlink(name)


def take(lapic: KvmLapic) -> int:
    with lapic.lock:
        return lapic.kvm_get_apic_interrupt()


def program(ioapic: KvmIoapic, pin: int, entry: int) -> None:
    """The guest's two MMIO writes per half, as io_apic.c's ioapic_write_entry does them."""
    for reg, half in ((IOAPIC_REDIR_TABLE_BASE + 2 * pin + 1, entry >> 32),
                      (IOAPIC_REDIR_TABLE_BASE + 2 * pin, entry & 0xFFFFFFFF)):
        ioapic.ioapic_mmio_write(IOAPIC_DEFAULT_BASE_ADDRESS + IOAPIC_REG_SELECT, 4, reg)
        ioapic.ioapic_mmio_write(IOAPIC_DEFAULT_BASE_ADDRESS + IOAPIC_REG_WINDOW, 4, half)


@pytest.mark.timeout(10)
def test_lapic_injects_by_priority_one_at_a_time_until_eoi(chip) -> None:
    lapic, _, _ = chip
    for v in (39, 40, 0x3B):
        lapic.kvm_apic_set_irq(v)
    assert take(lapic) == 0x3B  # highest first
    assert take(lapic) == -1  # 39 and 40 are of class 0x20 < 0x30 in service: they wait
    lapic.kvm_apic_set_irq(LOCAL_TIMER_VECTOR)
    assert take(lapic) == LOCAL_TIMER_VECTOR  # a higher class goes past (nested)
    assert lapic.apic_set_eoi() == LOCAL_TIMER_VECTOR
    assert lapic.apic_set_eoi() == 0x3B
    assert take(lapic) == 40
    assert take(lapic) == -1  # 39 is in 40's class: it waits for 40's EOI
    assert lapic.apic_set_eoi() == 40
    assert take(lapic) == 39 and lapic.apic_set_eoi() == 39
    assert lapic.apic_set_eoi() == -1 and lapic.irr == lapic.isr == 0


@pytest.mark.timeout(10)
def test_accepting_an_interrupt_kicks_a_vcpu_in_guest_mode_once(chip) -> None:
    lapic, _, _ = chip
    lapic.mode = IN_GUEST_MODE
    lapic.kvm_apic_set_irq(39)
    lapic.kvm_apic_set_irq(40)
    assert lapic.kick.pending == 1 and lapic.ipis == 1


@pytest.mark.timeout(10)
def test_ioapic_level_pin_waits_for_eoi_and_fires_again_while_the_line_is_up(chip) -> None:
    lapic, ioapic, routing = chip
    assert routing.kvm_set_irq(PIN, 1) == -1  # masked as the machine starts
    program(ioapic, PIN, VECTOR | IOAPIC_RTE_TRIG_MODE)
    assert take(lapic) == VECTOR  # unmasked with the line up: delivered
    assert ioapic.redirtbl[PIN] & IOAPIC_RTE_REMOTE_IRR
    assert lapic.tmr & (1 << VECTOR)
    assert routing.kvm_set_irq(PIN, 1) == -1  # Remote IRR set: ioapic_service refuses
    assert lapic.irr == 0
    lapic.apic_set_eoi()  # the line is still up: Remote IRR clears, the pin fires again
    assert take(lapic) == VECTOR
    routing.kvm_set_irq(PIN, 0)  # the guest read the ISR
    lapic.apic_set_eoi()
    assert not ioapic.redirtbl[PIN] & IOAPIC_RTE_REMOTE_IRR and lapic.irr == 0
    assert routing.kvm_set_irq(PIN, 1) == 1 and take(lapic) == VECTOR


@pytest.mark.timeout(10)
def test_ioapic_guest_cannot_set_remote_irr_and_masked_pins_stay_quiet(chip) -> None:
    lapic, ioapic, routing = chip
    program(ioapic, PIN, VECTOR | IOAPIC_RTE_TRIG_MODE | IOAPIC_RTE_REMOTE_IRR
            | IOAPIC_RTE_MASKED)
    assert not ioapic.redirtbl[PIN] & IOAPIC_RTE_REMOTE_IRR
    assert routing.kvm_set_irq(PIN, 1) == -1 and lapic.irr == 0
    ioapic.ioapic_mmio_write(IOAPIC_DEFAULT_BASE_ADDRESS + IOAPIC_REG_SELECT, 4,
                             IOAPIC_REDIR_TABLE_BASE + 2 * PIN)
    assert ioapic.ioapic_mmio_read(IOAPIC_DEFAULT_BASE_ADDRESS + IOAPIC_REG_WINDOW, 4) \
        == VECTOR | IOAPIC_RTE_TRIG_MODE | IOAPIC_RTE_MASKED
    assert routing.kvm_set_irq(99, 1) == -1  # no such GSI


@pytest.mark.timeout(10)
def test_msi_goes_to_the_vector_its_data_names_and_a_bad_address_finds_nobody(chip) -> None:
    lapic, _, routing = chip
    assert routing.kvm_send_userspace_msi(MSI_ADDR_BASE, 40) == 1
    assert routing.kvm_send_userspace_msi(MSI_ADDR_BASE | (5 << 12), 41) == -1  # APIC id 5
    assert routing.kvm_send_userspace_msi(0x1000, 42) == -1  # not the APIC's window
    assert routing.kvm_send_userspace_msi(MSI_ADDR_BASE, 43 | 0x100) == -1  # not fixed
    assert take(lapic) == 40 and lapic.irr == 0
    lapic.apic_set_eoi()
    routing.kvm_set_irq_routing([[30, KVM_IRQ_ROUTING_MSI, MSI_ADDR_BASE, 44 | 1 << 15]])
    assert routing.kvm_set_irq(30, 1) == 1
    assert lapic.tmr & (1 << 44) and take(lapic) == 44



@pytest.mark.timeout(10)
def test_ioapic_rte_rewrite_with_remote_irr_sends_nothing(chip) -> None:
    """Rewriting a level pin's entry (the guest masks and unmasks it) while its EOI is still
    owed sends nothing; the EOI does."""
    lapic, ioapic, routing = chip
    program(ioapic, PIN, VECTOR | IOAPIC_RTE_TRIG_MODE)
    assert routing.kvm_set_irq(PIN, 1) == 1 and take(lapic) == VECTOR
    program(ioapic, PIN, VECTOR | IOAPIC_RTE_TRIG_MODE | IOAPIC_RTE_MASKED)
    program(ioapic, PIN, VECTOR | IOAPIC_RTE_TRIG_MODE)
    assert ioapic.sent == 1 and lapic.irr == 0
    lapic.apic_set_eoi()
    assert ioapic.sent == 2 and take(lapic) == VECTOR


@pytest.mark.timeout(10)
def test_ioapic_eoi_storm_delays_the_next_injection(chip, monkeypatch) -> None:
    """A level line the guest never lowers: after IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT EOIs in a
    row that each re-send it, the next is sent by the delayed work instead of at once."""
    lapic, ioapic, routing = chip
    monkeypatch.setattr(ioapic_mod, "IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT", 3)
    program(ioapic, PIN, VECTOR | IOAPIC_RTE_TRIG_MODE)
    routing.kvm_set_irq(PIN, 1)
    for _ in range(2):
        assert take(lapic) == VECTOR
        lapic.apic_set_eoi()
    assert take(lapic) == VECTOR
    lapic.apic_set_eoi()  # the third in a row: deferred
    assert ioapic.delayed_eoi_injections == 1
    deadline = time.monotonic() + 5
    while ioapic.sent < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert ioapic.sent == 4 and take(lapic) == VECTOR


@pytest.mark.timeout(10)
def test_irqfd_takes_every_pending_signal_in_one_injection(chip) -> None:
    """irqfd_wakeup reads the eventfd: three signals posted before the wake-up make one
    MSI, as three writes to an eventfd make one read."""
    lapic, _, routing = chip
    routing.kvm_set_irq_routing([[24, KVM_IRQ_ROUTING_MSI, MSI_ADDR_BASE, 45]])
    name = f"/vnr-test-irqfd-{secrets.token_hex(6)}"
    sem = EventNotifier(name, create=True)
    try:
        for _ in range(3):
            sem.set()
        irqfd = Irqfd(24, name, routing, KvmStats())
        deadline = time.monotonic() + 5
        while sem.pending and time.monotonic() < deadline:
            time.sleep(0.005)
        irqfd.shutdown()
        irqfd.thread.join(5)
        assert not irqfd.thread.is_alive()
        assert (irqfd.signals, routing.msis) == (1, 1) and take(lapic) == 45
    finally:
        sem.close()
        EventNotifier.unlink(name)
