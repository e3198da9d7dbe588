"""Stands for accel/kvm/kvm-all.c: QEMU's side of KVM.

``kvm_cpu_exec`` is the vCPU thread's loop: KVM_RUN (with the Big QEMU Lock released), then
``switch (run->exit_reason)``: port I/O goes to ``kvm_handle_io`` -> ``address_space_rw`` on
the I/O address space, MMIO to the memory address space, shutdown ends the VM.
The memory listener registers region eventfds with KVM (``kvm_io_ioeventfd_add``), and the
irqchip helpers set up MSI routes and irqfds.
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
    KVM_IOEVENTFD,
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQFD,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_RUN,
    KVM_SET_GSI_ROUTING,
    kvm_run,
    packb,
)
from common.trace import trace_event, traced
from qemuproc.memory import (
    AddressSpace,
    MemoryListener,
    MemoryRegion,
    MemoryRegionIoeventfd,
    address_space_rw,
)

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
FIRST_MSI_GSI = 24

trace_kvm_vcpu_ioctl = trace_event("kvm_vcpu_ioctl")
trace_kvm_vm_ioctl = trace_event("kvm_vm_ioctl")
trace_kvm_run_exit = trace_event("kvm_run_exit")
trace_kvm_set_ioeventfd_pio = trace_event("kvm_set_ioeventfd_pio")
trace_kvm_irqchip_add_msi_route = trace_event("kvm_irqchip_add_msi_route")
trace_kvm_irqchip_commit_routes = trace_event("kvm_irqchip_commit_routes")


class KvmError(Exception):
    pass


class KVMState:
    def __init__(self, vm_req: Channel, vm_rep: Channel) -> None:
        self._vm_req = vm_req
        self._vm_rep = vm_rep
        self._lock = threading.Lock()
        self.routes: dict[int, tuple[int, int]] = {}
        self.ioctls = 0

    def kvm_vm_ioctl(self, *req: Any) -> Any:
        """Send one VM ioctl and wait for its result; a negative errno raises KvmError."""
        if trace_kvm_vm_ioctl.on:
            trace_kvm_vm_ioctl(type=req[0])
        with self._lock:
            self.ioctls += 1
            self._vm_req.send(list(req))
            rep = self._vm_rep.recv(5.0)
        if rep is None:
            raise KvmError(f"{req[0]}: KVM did not answer")
        if rep[0] < 0:
            raise KvmError(f"{req[0]}: errno {-rep[0]}")
        return rep[1]

    # -- irqchip --------------------------------------------------------------------------------

    def kvm_irqchip_add_msi_route(self, vector: int, msi_data: int) -> int:
        gsi = FIRST_MSI_GSI + vector
        self.routes[gsi] = (KVM_IRQ_ROUTING_MSI, msi_data)
        if trace_kvm_irqchip_add_msi_route.on:
            trace_kvm_irqchip_add_msi_route(vector=vector, virq=gsi)
        return gsi

    def kvm_irqchip_add_intx_route(self, pin: int) -> int:
        self.routes[pin] = (KVM_IRQ_ROUTING_IRQCHIP, pin)
        return pin

    def kvm_irqchip_release_virq(self, gsi: int) -> None:
        self.routes.pop(gsi, None)

    def kvm_irqchip_commit_routes(self) -> None:
        if trace_kvm_irqchip_commit_routes.on:
            trace_kvm_irqchip_commit_routes()
        self.kvm_vm_ioctl(KVM_SET_GSI_ROUTING,
                          [[gsi, kind, val] for gsi, (kind, val) in self.routes.items()])

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
        kvm_io_ioeventfd_add(self.s, mr.base + e.addr, e.size, e.match_data, e.data, e.notifier,
                             as_.is_io)

    def eventfd_del(self, as_: AddressSpace, mr: MemoryRegion, e: MemoryRegionIoeventfd) -> None:
        kvm_io_ioeventfd_del(self.s, mr.base + e.addr, e.size, e.match_data, e.data, as_.is_io)


def kvm_io_ioeventfd_add(s: KVMState, addr: int, size: int, match_data: bool, data: int,
                         notifier: str, is_pio: bool = True) -> None:
    flags = (KVM_IOEVENTFD_FLAG_PIO if is_pio else 0) | (
        KVM_IOEVENTFD_FLAG_DATAMATCH if match_data else 0)
    if trace_kvm_set_ioeventfd_pio.on:
        trace_kvm_set_ioeventfd_pio(fd=notifier, addr=addr, val=data, assign=True, size=size,
                                    datamatch=match_data)
    s.kvm_vm_ioctl(KVM_IOEVENTFD, addr, size, data, flags, notifier)


def kvm_io_ioeventfd_del(s: KVMState, addr: int, size: int, match_data: bool, data: int,
                         is_pio: bool = True) -> None:
    flags = KVM_IOEVENTFD_FLAG_DEASSIGN | (KVM_IOEVENTFD_FLAG_PIO if is_pio else 0) | (
        KVM_IOEVENTFD_FLAG_DATAMATCH if match_data else 0)
    if trace_kvm_set_ioeventfd_pio.on:
        trace_kvm_set_ioeventfd_pio(fd="", addr=addr, val=data, assign=False, size=size,
                                    datamatch=match_data)
    s.kvm_vm_ioctl(KVM_IOEVENTFD, addr, size, data, flags, "")


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

    def kvm_vcpu_ioctl_run(self) -> list:
        if trace_kvm_vcpu_ioctl.on:
            trace_kvm_vcpu_ioctl(cpu_index=self.cpu_index, type=KVM_RUN)
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
        val = address_space_rw(cpu.io_as, port, data, size, direction == KVM_EXIT_IO_OUT)
        if direction != KVM_EXIT_IO_OUT:
            cpu.run_data = val


@traced
def kvm_handle_mmio(cpu: CPUState, addr: int, data: int, length: int, is_write: bool) -> None:
    val = address_space_rw(cpu.mem_as, addr, data, length, is_write)
    if not is_write:
        cpu.run_data = val


def kvm_handle_exit(cpu: CPUState, run: list) -> bool:
    """One turn of kvm_cpu_exec's ``switch (run->exit_reason)``; False when the VM is to
    shut down (-no-reboot: a guest reset is a shutdown)."""
    reason = run[0]
    name = KVM_EXIT_NAMES.get(reason, "KVM_EXIT_UNKNOWN")
    cpu.exit_counts[name] += 1
    if trace_kvm_run_exit.on:
        trace_kvm_run_exit(cpu_index=cpu.cpu_index, reason=reason, name=name)
    if reason == KVM_EXIT_IO:
        _, direction, size, port, count, data = run
        kvm_handle_io(cpu, port, data, direction, size, count)
    elif reason == KVM_EXIT_MMIO:
        _, addr, length, is_write, data = run
        kvm_handle_mmio(cpu, addr, data, length, bool(is_write))
    elif reason == KVM_EXIT_SHUTDOWN:
        cpu.shutdown_requested = True
        return False
    elif reason != KVM_EXIT_INTR:
        raise KvmError(f"KVM: unhandled exit reason {reason}")
    return True


@traced
def kvm_cpu_exec(cpu: CPUState) -> int:
    """Run the vCPU until something needs the rest of QEMU (shutdown); returns the cause."""
    while True:
        cpu.bql.release()  # qemu_mutex_unlock_iothread: KVM_RUN runs without the BQL
        try:
            if cpu.gate.armed:
                cpu.gate.wait()
            run = cpu.kvm_vcpu_ioctl_run()
        finally:
            cpu.bql.acquire()
        if not kvm_handle_exit(cpu, run):
            return run[0]
