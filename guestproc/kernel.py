"""The guest kernel's core that the driver leans on.

kernel/irq (``request_irq``, the IDT, and the flow handlers: ``handle_edge_irq`` for MSIs
and the APIC timer acknowledges the local APIC before the handler runs,
``handle_fasteoi_irq`` for an IOAPIC line after it), kernel/softirq.c (``irq_exit`` ->
``do_softirq``), net/core/dev.c's NAPI (``napi_schedule_prep``, ``__napi_schedule``,
``napi_complete_done``, ``net_rx_action``), the local APIC timer in TSC-deadline mode, and
the idle loop (HLT).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from common.kvm_abi import ISA_IRQ_VECTOR_BASE, LOCAL_TIMER_VECTOR, MSR_IA32_TSC_DEADLINE
from common.trace import trace_event, traced
from guestproc.cpu import VCpu
from guestproc.io_apic import IoApic

NAPI_POLL_WEIGHT = 64
NET_RX_BUDGET = 300  # netdev_budget

IRQ_NONE = 0
IRQ_HANDLED = 1

trace_irq_handler_entry = trace_event("irq_handler_entry")
trace_napi_poll = trace_event("napi_poll")


class Napi:
    """struct napi_struct: a poll function the softirq calls with a budget."""

    __slots__ = ("name", "poll", "weight", "sched", "poll_list", "owner")

    def __init__(self, name: str, poll: Callable[[Napi, int], int], weight: int,
                 poll_list: list[Napi], owner: object = None) -> None:
        self.owner = owner
        self.name = name
        self.poll = poll
        self.weight = weight
        self.sched = False
        self.poll_list = poll_list


def napi_schedule_prep(napi: Napi) -> bool:
    if napi.sched:
        return False
    napi.sched = True
    return True


def __napi_schedule(napi: Napi) -> None:
    napi.poll_list.append(napi)


def napi_schedule(napi: Napi) -> bool:
    if napi_schedule_prep(napi):
        __napi_schedule(napi)
        return True
    return False


def napi_complete_done(napi: Napi, work_done: int) -> bool:
    napi.sched = False
    return True


def napi_disable(napi: Napi) -> None:
    """Off the poll list, and held scheduled so nothing can schedule it."""
    napi.sched = True
    if napi in napi.poll_list:
        napi.poll_list.remove(napi)


def napi_enable(napi: Napi) -> None:
    napi.sched = False


class Kernel:
    def __init__(self, cpu: VCpu) -> None:
        self.cpu = cpu
        self.irq_names: dict[int, str] = {}
        self.poll_list: list[Napi] = []
        self.timer_deadline = 0
        self.timer_fired = False
        self.irq_count: dict[str, int] = {}
        self.ioapic = IoApic(cpu)
        self.timer_interrupts = 0
        cpu.irq_exit = self.do_softirq
        cpu.idt[LOCAL_TIMER_VECTOR] = self.sysvec_apic_timer_interrupt

    now_ns = staticmethod(time.monotonic_ns)  # rdtsc: the TSC is not intercepted

    # -- interrupts -----------------------------------------------------------------------------

    def request_irq(self, vector: int, handler: Callable[[int], int], name: str,
                    level: bool = False) -> None:
        """Install ``handler`` at ``vector``: edge flow (an MSI), or fasteoi (``level``)."""
        self.irq_names[vector] = name
        self.irq_count.setdefault(name, 0)
        cpu = self.cpu

        def handle_irq_event(v: int) -> None:
            self.irq_count[name] += 1
            if trace_irq_handler_entry.on:
                trace_irq_handler_entry(irq=v, name=name)
            handler(v)

        def handle_edge_irq(v: int) -> None:
            cpu.apic_eoi()  # irq_chip_ack_parent -> apic_ack_edge
            handle_irq_event(v)

        def handle_fasteoi_irq(v: int) -> None:
            handle_irq_event(v)
            cpu.apic_eoi()  # ioapic_ack_level: the EOI that KVM broadcasts to the IOAPIC

        cpu.idt[vector] = handle_fasteoi_irq if level else handle_edge_irq

    def synchronize_irq(self, vector: int) -> None:
        """Wait until no handler of ``vector`` runs on another CPU. The one vCPU runs every
        handler to its end before anything else, so none can be running while its caller
        runs: there is nothing to wait for."""

    def free_irq(self, vector: int) -> None:
        self.cpu.idt.pop(vector, None)
        self.irq_names.pop(vector, None)

    def request_intx(self, line: int, handler: Callable[[int], int], name: str) -> int:
        """request_irq on a PCI line: the IOAPIC pin ``line`` gets its vector, level
        triggered, and is unmasked once the handler is in place. Returns the vector."""
        vector = ISA_IRQ_VECTOR_BASE + line
        self.ioapic.setup_ioapic_irq(line, vector)
        self.request_irq(vector, handler, name, level=True)
        self.ioapic.unmask_ioapic_irq(line)
        return vector

    def free_intx(self, line: int) -> None:
        self.ioapic.mask_ioapic_irq(line)
        self.free_irq(ISA_IRQ_VECTOR_BASE + line)

    def sysvec_apic_timer_interrupt(self, vector: int) -> None:
        self.cpu.apic_eoi()
        self.timer_fired = True
        self.timer_interrupts += 1

    # -- softirq ------------------------------------------------------------------------------

    def napi_add(self, name: str, poll: Callable[[Napi, int], int], owner: object,
                 weight: int = NAPI_POLL_WEIGHT) -> Napi:
        """netif_napi_add: ``owner`` is what container_of() would find (the queue)."""
        return Napi(name, poll, weight, self.poll_list, owner)

    def do_softirq(self) -> None:
        if self.poll_list:
            self.net_rx_action()

    @traced
    def net_rx_action(self) -> None:
        budget = NET_RX_BUDGET
        while self.poll_list and budget > 0:
            napi = self.poll_list.pop(0)
            if trace_napi_poll.on:
                trace_napi_poll(napi=napi.name, budget=napi.weight)
            work = napi.poll(napi, napi.weight)
            budget -= work
            if work >= napi.weight and napi.sched:
                self.poll_list.append(napi)  # more to do: stays scheduled, goes to the back

    # -- time and idle --------------------------------------------------------------------------

    def arm_timer(self, deadline_ns: int) -> None:
        """Program the LAPIC timer in TSC-deadline mode (a trapping WRMSR that KVM emulates)."""
        if deadline_ns != self.timer_deadline:
            self.timer_deadline = deadline_ns
            self.timer_fired = False
            self.cpu.wrmsr(MSR_IA32_TSC_DEADLINE, deadline_ns)

    @staticmethod
    def cpu_relax() -> None:
        """PAUSE in a spin loop: here, give the host CPU to the other processes."""
        os.sched_yield()

    def idle(self) -> None:
        """cpu_idle: HLT until an interrupt, unless one was handled since the caller last
        looked (need_resched): halting then would sleep through the wakeup it brought."""
        cpu = self.cpu
        if cpu.need_resched:
            cpu.need_resched = False
            return
        if self.poll_list:  # net_rx_action ran out of budget: ksoftirqd goes on, no HLT
            self.do_softirq()
            return
        cpu.hlt()
        cpu.need_resched = False

    def wait_event(self, cond: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Sleep (HLT) until ``cond()`` holds or ``timeout_s`` passes; returns cond()."""
        deadline = None if timeout_s is None else self.now_ns() + int(timeout_s * 1e9)
        cpu = self.cpu
        while True:
            cpu.need_resched = False
            cpu.interrupt_window()
            if cond():
                return True
            if deadline is not None:
                if self.now_ns() >= deadline:
                    return cond()
                self.arm_timer(deadline)
            self.idle()

    def msleep(self, ms: float) -> None:
        deadline = self.now_ns() + int(ms * 1e6)
        while self.now_ns() < deadline:
            self.cpu.need_resched = False
            self.arm_timer(deadline)
            self.idle()
