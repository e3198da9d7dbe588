"""Stands for virt/kvm/eventfd.c: ioeventfd (a guest write that signals an eventfd without
leaving the kernel) and irqfd (an eventfd whose signal injects an interrupt): an eventfd is
a named semaphore posted by its signaller and taken by a waiter thread (README: why not
Linux's wake-up callbacks in the signaller's thread), or, for a vhost-user peer, a real
eventfd of QEMU's taken with pidfd_getfd (common/eventfd.py)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from common.eventfd import EventfdNotifier, open_notifier
from common.notifier import EventNotifier
from common.trace import trace_event, traced
from kvmproc.irqchip import IrqRouting
from kvmproc.stats import KvmStats

trace_kvm_ioeventfd_signal = trace_event("ioeventfd_write")
trace_irqfd_wakeup = trace_event("irqfd_wakeup")

@dataclass
class Ioeventfd:
    """struct _ioeventfd: a (bus, address, length, datamatch) that signals a notifier."""

    addr: int
    length: int
    datamatch: int | None
    notifier: EventNotifier | EventfdNotifier
    is_pio: bool
    signals: int = 0


class IoeventfdBus:
    """The ioeventfds registered on the PIO and MMIO buses (kvm_io_bus_write's devices)."""

    def __init__(self, stats: KvmStats) -> None:
        self.stats = stats
        self.fds: dict[tuple[bool, int, int], list[Ioeventfd]] = {}

    def kvm_assign_ioeventfd(self, is_pio: bool, addr: int, length: int,
                             datamatch: int | None, name: str) -> None:
        """Register an ioeventfd; this very one registered already is kept, not doubled (a
        QEMU that took over from one that died sets its device up again; real KVM answers
        -EEXIST, which such a QEMU would take as done)."""
        lst = self.fds.setdefault((is_pio, addr, length), [])
        if any(p.datamatch == datamatch and p.notifier.name == name for p in lst):
            return
        lst.append(Ioeventfd(addr, length, datamatch, open_notifier(name), is_pio))

    def kvm_deassign_ioeventfd(self, is_pio: bool, addr: int, length: int,
                               datamatch: int | None) -> bool:
        lst = self.fds.get((is_pio, addr, length), [])
        for p in lst:
            if p.datamatch == datamatch:
                lst.remove(p)
                p.notifier.close()
                return True
        return False

    def ioeventfd_write(self, is_pio: bool, addr: int, length: int, val: int) -> bool:
        """kvm_io_bus_write: True if an ioeventfd took the write (the guest resumes at once).
        ioeventfd_in_range: the address must be exact; a length of 0 (an MMIO ioeventfd on
        KVM_FAST_MMIO_BUS, registered without datamatch) takes a write of any length."""
        lst = self.fds.get((is_pio, addr, length))
        if not lst:
            lst = self.fds.get((is_pio, addr, 0))
            if not lst:
                return False
        for p in lst:
            if p.datamatch is None or p.datamatch == val:
                p.signals += 1
                self.stats.vcpu["ioeventfd_signals"] += 1
                if trace_kvm_ioeventfd_signal.on:
                    trace_kvm_ioeventfd_signal(addr=addr, len=length, val=val)
                p.notifier.set()  # eventfd_signal
                return True
        return False

    def describe(self) -> list[dict]:
        return [{"bus": "pio" if p.is_pio else "mmio", "addr": p.addr, "len": p.length,
                 "datamatch": p.datamatch, "eventfd": p.notifier.name, "signals": p.signals}
                for lst in self.fds.values() for p in lst]


class Irqfd:
    """struct kvm_kernel_irqfd: a waiter on the notifier that injects its GSI when signalled."""

    def __init__(self, gsi: int, name: str, routing: IrqRouting, stats: KvmStats) -> None:
        self.gsi = gsi
        self.notifier = open_notifier(name)
        self.routing = routing
        self.stats = stats
        self.signals = 0
        self.active = True
        self.thread = threading.Thread(target=self._wait, name=f"irqfd-gsi{gsi}", daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        wait = self.notifier.wait
        try:
            while self.active:
                if not wait(0.25):
                    continue
                if not self.active:  # deassigned meanwhile: leave the signal to the new owner
                    self.notifier.set()
                    return
                self.irqfd_wakeup()
        finally:
            if isinstance(self.notifier, EventfdNotifier):  # the duplicate pidfd_getfd made
                self.notifier.close()

    @traced
    def irqfd_wakeup(self) -> None:
        """EPOLLIN on the eventfd: its read takes every signal posted so far, so they make
        one injection. An MSI route is delivered at once (kvm_arch_set_irq_inatomic);
        anything else raises and lowers the line (irqfd_inject)."""
        self.notifier.test_and_clear()  # eventfd_ctx_do_read
        self.signals += 1
        self.stats.vcpu["irqfd_signals"] += 1
        if trace_irqfd_wakeup.on:
            trace_irqfd_wakeup(gsi=self.gsi)
        if self.routing.kvm_arch_set_irq_inatomic(self.gsi) == -11:
            self.irqfd_inject()

    def irqfd_inject(self) -> None:
        self.routing.kvm_set_irq(self.gsi, 1)
        self.routing.kvm_set_irq(self.gsi, 0)

    def shutdown(self) -> None:
        self.active = False


class IrqfdTable:
    def __init__(self, routing: IrqRouting, stats: KvmStats) -> None:
        self.routing = routing
        self.stats = stats
        self.irqfds: dict[int, Irqfd] = {}

    def kvm_irqfd_assign(self, gsi: int, name: str) -> None:
        """Route ``name``'s signals to ``gsi``, in place of what was there; the same irqfd
        still active there is kept (as for ioeventfds, a QEMU taking over assigns again)."""
        old = self.irqfds.get(gsi)
        if old is not None:
            if old.active and old.notifier.name == name:
                return
            old.shutdown()
        self.irqfds[gsi] = Irqfd(gsi, name, self.routing, self.stats)

    def kvm_irqfd_deassign(self, gsi: int) -> bool:
        old = self.irqfds.pop(gsi, None)
        if old is None:
            return False
        old.shutdown()
        return True

    def describe(self) -> list[dict]:
        return [{"gsi": f.gsi, "eventfd": f.notifier.name, "route": self.routing.routes.get(f.gsi),
                 "signals": f.signals} for f in self.irqfds.values()]

    def shutdown(self) -> None:
        for f in self.irqfds.values():
            f.shutdown()
