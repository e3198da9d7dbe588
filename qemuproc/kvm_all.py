"""Stands for accel/kvm/kvm-all.c: QEMU's side of KVM.

``kvm_cpu_exec`` is the vCPU thread's run: with the Big QEMU Lock released, KVM_RUN, then
``switch (run->exit_reason)``: port I/O goes to ``kvm_handle_io`` -> ``address_space_rw`` on
the I/O address space, MMIO to the memory address space (each access takes the BQL for
itself, as ``prepare_mmio_access`` does for a region with global locking), and again; a
signal (KVM_EXIT_INTR) or a shutdown returns EXCP_INTERRUPT to the vCPU thread, which then
serves its stop requests (``qemu_wait_io_event``) and calls it again.
The memory listeners register region eventfds with KVM (``kvm_set_ioeventfd_pio`` for the
I/O address space, ``kvm_set_ioeventfd_mmio`` for memory); the
irqchip helpers send MSIs (``kvm_irqchip_send_msi``: KVM_SIGNAL_MSI), set INTx lines
(``kvm_set_irq``: KVM_IRQ_LINE_STATUS), and set up MSI routes and irqfds for the devices
that use them (vhost, dataplane).
"""

from __future__ import annotations

import threading
from typing import Any

from common.channel import Channel
from common.cpus import Gate
from common.kvm_abi import (
    KVM_DESTROY_VM,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_EXIT_NAMES,
    KVM_EXIT_SHUTDOWN,
    KVM_IOCTL_NR,
    KVM_IOEVENTFD,
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQ_LINE_STATUS,
    KVM_IRQ_ROUTING_MSI,
    KVM_IRQFD,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_RUN,
    KVM_SET_GSI_ROUTING,
    KVM_SIGNAL_MSI,
    kvm_run,
    packb,
    unpackb,
)
from common.trace import trace_event, traced
from qemuproc.memory import (
    AddressSpace,
    MemoryListener,
    MemoryRegion,
    MemoryRegionIoeventfd,
    address_space_rw,
)

FIRST_MSI_GSI = 24
IOCTL_ARG_ADDR = 0x7FFD2C3A5E40
"""A stable fake address for the struct an ioctl is passed (on QEMU's stack)."""
EXCP_INTERRUPT = 0x10000

trace_kvm_vcpu_ioctl = trace_event("kvm_vcpu_ioctl")
trace_kvm_vm_ioctl = trace_event("kvm_vm_ioctl")
trace_kvm_run_exit = trace_event("kvm_run_exit")
trace_kvm_set_ioeventfd_pio = trace_event("kvm_set_ioeventfd_pio")
trace_kvm_set_ioeventfd_mmio = trace_event("kvm_set_ioeventfd_mmio")
trace_kvm_irqchip_add_msi_route = trace_event("kvm_irqchip_add_msi_route")
trace_kvm_irqchip_commit_routes = trace_event("kvm_irqchip_commit_routes")
trace_kvm_irqchip_release_virq = trace_event("kvm_irqchip_release_virq")


class KvmError(Exception):
    pass


class KVMState:
    def __init__(self, vm_req: Channel, vm_rep: Channel) -> None:
        self._vm_req = vm_req
        self._vm_rep = vm_rep
        self._lock = threading.Lock()
        self.routes: dict[int, tuple[int, int, int]] = {}
        self.ioctls = 0
        self.msis_lost = 0
        self.eventfd_fds: dict[str, int] = {}  # notifier -> its fd (event_notifier_get_fd)
        self._msi_records: dict[tuple[int, int], bytes] = {}

    def kvm_vm_ioctl(self, *req: Any) -> Any:
        """Send one VM ioctl and wait for its result; a negative errno raises KvmError."""
        ret, payload = self._vm_ioctl(req[0], packb(list(req)))
        if ret < 0:
            raise KvmError(f"{req[0]}: errno {-ret}")
        return payload

    def _vm_ioctl(self, op: str, record: bytes) -> list:
        """One VM ioctl, already packed: [ret, payload]."""
        if trace_kvm_vm_ioctl.on and op in KVM_IOCTL_NR:
            trace_kvm_vm_ioctl(type=KVM_IOCTL_NR[op], arg=IOCTL_ARG_ADDR)
        with self._lock:
            self.ioctls += 1
            self._vm_req.send_raw(record)
            rep = self._vm_rep.recv_raw(5.0)
        if rep is None:
            raise KvmError(f"{op}: KVM did not answer")
        return unpackb(rep)

    # -- irqchip --------------------------------------------------------------------------------

    def kvm_irqchip_send_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI from the calling thread (kvm_send_msi of the APIC's MSI window);
        a message KVM cannot deliver is lost, as QEMU reports "MSI lost" and goes on."""
        key = (address, data)
        record = self._msi_records.get(key)
        if record is None:
            record = packb([KVM_SIGNAL_MSI, address, data])
            if len(self._msi_records) < 64:
                self._msi_records[key] = record
        ret = self._vm_ioctl(KVM_SIGNAL_MSI, record)[0]
        if ret < 0:
            self.msis_lost += 1
        return ret

    def kvm_set_irq(self, irq: int, level: int) -> int:
        """KVM_IRQ_LINE_STATUS: a GSI's line level; returns KVM's status."""
        return self.kvm_vm_ioctl(KVM_IRQ_LINE_STATUS, irq, level)

    def kvm_irqchip_add_msi_route(self, name: str, vector: int, address: int,
                                  data: int) -> int:
        gsi = FIRST_MSI_GSI + vector
        self.routes[gsi] = (KVM_IRQ_ROUTING_MSI, address, data)
        if trace_kvm_irqchip_add_msi_route.on:
            trace_kvm_irqchip_add_msi_route(name=name, vector=vector, virq=gsi)
        return gsi

    def kvm_irqchip_update_msi_route(self, gsi: int, address: int, data: int) -> None:
        self.routes[gsi] = (KVM_IRQ_ROUTING_MSI, address, data)

    def kvm_irqchip_release_virq(self, gsi: int) -> None:
        if trace_kvm_irqchip_release_virq.on:
            trace_kvm_irqchip_release_virq(virq=gsi)
        self.routes.pop(gsi, None)

    def kvm_irqchip_commit_routes(self) -> None:
        if trace_kvm_irqchip_commit_routes.on:
            trace_kvm_irqchip_commit_routes()
        self.kvm_vm_ioctl(KVM_SET_GSI_ROUTING,
                          [[gsi, kind, a, b] for gsi, (kind, a, b) in self.routes.items()])

    def kvm_irqchip_add_irqfd_notifier_gsi(self, notifier: str, gsi: int) -> None:
        self.kvm_vm_ioctl(KVM_IRQFD, gsi, 0, notifier)

    def kvm_irqchip_remove_irqfd_notifier_gsi(self, gsi: int) -> None:
        self.kvm_vm_ioctl(KVM_IRQFD, gsi, KVM_IRQFD_FLAG_DEASSIGN, "")

    def kvm_destroy_vm(self) -> None:
        self.kvm_vm_ioctl(KVM_DESTROY_VM)


class KvmIoListener(MemoryListener):
    """kvm_io_listener: region eventfds on the I/O address space become PIO ioeventfds."""

    def __init__(self, s: KVMState) -> None:
        self.s = s

    def eventfd_add(self, as_: AddressSpace, mr: MemoryRegion, e: MemoryRegionIoeventfd) -> None:
        kvm_set_ioeventfd_pio(self.s, e.notifier, mr.base + e.addr, e.data, True, e.size,
                              e.match_data)

    def eventfd_del(self, as_: AddressSpace, mr: MemoryRegion, e: MemoryRegionIoeventfd) -> None:
        kvm_set_ioeventfd_pio(self.s, e.notifier, mr.base + e.addr, e.data, False, e.size,
                              e.match_data)


class KvmMemoryListener(MemoryListener):
    """kvm_memory_listener's eventfd part (kvm_mem_ioeventfd_add/del): region eventfds on
    the memory address space become MMIO ioeventfds."""

    def __init__(self, s: KVMState) -> None:
        self.s = s

    def eventfd_add(self, as_: AddressSpace, mr: MemoryRegion, e: MemoryRegionIoeventfd) -> None:
        kvm_set_ioeventfd_mmio(self.s, e.notifier, mr.base + e.addr, e.data, True, e.size,
                               e.match_data)

    def eventfd_del(self, as_: AddressSpace, mr: MemoryRegion, e: MemoryRegionIoeventfd) -> None:
        kvm_set_ioeventfd_mmio(self.s, e.notifier, mr.base + e.addr, e.data, False, e.size,
                               e.match_data)


def kvm_set_ioeventfd_mmio(s: KVMState, notifier: str, addr: int, val: int, assign: bool,
                           size: int, datamatch: bool) -> None:
    """KVM_IOEVENTFD on the MMIO bus (no KVM_IOEVENTFD_FLAG_PIO); size 0 matches any
    length, which virtio-pci's modern notify asks for when KVM can do it."""
    if trace_kvm_set_ioeventfd_mmio.on:
        trace_kvm_set_ioeventfd_mmio(fd=s.eventfd_fds.get(notifier, -1), addr=addr, val=val,
                                     assign=assign, size=size, datamatch=datamatch)
    flags = (KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch else 0) | (
        0 if assign else KVM_IOEVENTFD_FLAG_DEASSIGN)
    s.kvm_vm_ioctl(KVM_IOEVENTFD, addr, size, val if datamatch else 0, flags,
                   notifier if assign else "")


def kvm_set_ioeventfd_pio(s: KVMState, notifier: str, addr: int, val: int, assign: bool,
                          size: int, datamatch: bool) -> None:
    """KVM_IOEVENTFD on the PIO bus (KVM_IOEVENTFD_FLAG_PIO)."""
    if trace_kvm_set_ioeventfd_pio.on:
        trace_kvm_set_ioeventfd_pio(fd=s.eventfd_fds.get(notifier, -1), addr=addr, val=val,
                                    assign=assign, size=size, datamatch=datamatch)
    flags = KVM_IOEVENTFD_FLAG_PIO | (KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch else 0) | (
        0 if assign else KVM_IOEVENTFD_FLAG_DEASSIGN)
    s.kvm_vm_ioctl(KVM_IOEVENTFD, addr, size, val, flags, notifier if assign else "")


class CPUState:
    """One vCPU as QEMU holds it: its KVM_RUN channel and the last kvm_run exit."""

    def __init__(self, req: Channel, exits: Channel, bql: threading.RLock,
                 io_as: AddressSpace, mem_as: AddressSpace) -> None:
        self.cpu_index = 0
        self._send = req.send_raw
        self._recv = exits.recv
        self.bql = bql
        self.io_as = io_as
        self.mem_as = mem_as
        self.run_data = 0
        self.exit_counts = {name: 0 for name in KVM_EXIT_NAMES.values()}
        self.stopped = False
        self.shutdown_requested = False
        self._run_cache = {0: kvm_run(0)}
        self.gate = Gate("CPU 0/KVM", "CPU 0/KVM")
        self.gate.on_park = bql.release  # qemu_cond_wait(cpu->halt_cond, &qemu_global_mutex)
        self.gate.on_unpark = bql.acquire

    def kvm_vcpu_ioctl_run(self) -> list:
        if trace_kvm_vcpu_ioctl.on:
            trace_kvm_vcpu_ioctl(cpu_index=self.cpu_index, type=KVM_IOCTL_NR[KVM_RUN], arg=0)
        data = self.run_data
        self.run_data = 0
        self._send(self._run_cache[0] if data == 0 else packb([KVM_RUN, data]))
        rec = self._recv(None)
        assert rec is not None
        return rec


@traced
def kvm_handle_io(cpu: CPUState, port: int, data: int, direction: int, size: int,
                  count: int) -> None:
    """Each of ``count`` accesses becomes one address_space_rw on the I/O address space."""
    for _ in range(count):
        with cpu.bql:  # prepare_mmio_access
            val = address_space_rw(cpu.io_as, port, data, size, direction == KVM_EXIT_IO_OUT)
        if direction != KVM_EXIT_IO_OUT:
            cpu.run_data = val


def kvm_handle_exit(cpu: CPUState, run: list) -> int:
    """One turn of kvm_cpu_exec's ``switch (run->exit_reason)``, without the BQL: 0 to go on
    with KVM_RUN, EXCP_INTERRUPT to return to the vCPU thread (a signal, or a shutdown:
    with -no-reboot a guest reset is a shutdown)."""
    reason = run[0]
    name = KVM_EXIT_NAMES.get(reason, "KVM_EXIT_UNKNOWN")
    cpu.exit_counts[name] += 1
    if trace_kvm_run_exit.on:
        trace_kvm_run_exit(cpu_index=cpu.cpu_index, reason=reason)
    if reason == KVM_EXIT_IO:
        _, direction, size, port, count, data = run
        kvm_handle_io(cpu, port, data, direction, size, count)
    elif reason == KVM_EXIT_MMIO:
        _, addr, length, is_write, data = run
        with cpu.bql:  # prepare_mmio_access; kvm_cpu_exec calls address_space_rw itself
            val = address_space_rw(cpu.mem_as, addr, data, length, bool(is_write))
        if not is_write:
            cpu.run_data = val
    elif reason == KVM_EXIT_SHUTDOWN:
        cpu.shutdown_requested = True
        return EXCP_INTERRUPT
    elif reason == KVM_EXIT_INTR:
        return EXCP_INTERRUPT
    else:
        raise KvmError(f"KVM: unhandled exit reason {reason}")
    return 0


@traced
def kvm_cpu_exec(cpu: CPUState) -> int:
    """KVM_RUN and its exits, with the BQL released (the caller holds it), until one returns
    EXCP_INTERRUPT. A stop request pending after an exit (cpu->exit_request) ends it too:
    QEMU's kvm_cpu_kick_self would make the next KVM_RUN return at once."""
    cpu.bql.release()  # qemu_mutex_unlock_iothread
    try:
        while True:
            ret = kvm_handle_exit(cpu, cpu.kvm_vcpu_ioctl_run())
            if ret or cpu.gate.armed:
                return ret or EXCP_INTERRUPT
    finally:
        cpu.bql.acquire()


def qemu_wait_io_event(cpu: CPUState) -> None:
    """The vCPU thread between runs: held here while the VM is stopped (BQL released)."""
    if cpu.gate.armed:
        cpu.gate.wait()
