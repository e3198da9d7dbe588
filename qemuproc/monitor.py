"""QEMU's monitors (stands for monitor/ as softmmu/vl.c sets it up): HMP on
``monitor.qemu.sock`` and QMP on ``qmp.sock``, sharing one command table: the virtio device
and its queues, PCI, the memory map, the network, the main loop's bottom halves and fd
handlers, guest memory, and the VM's run state.

QMP commands run in the main loop with the Big QEMU Lock held, as in QEMU 7.2: the
monitor's I/O thread queues a request and wakes the dispatcher (``qmp_dispatcher_co_wake``
-> ``aio_co_wake``), which runs in a bottom half of the main AioContext
(``co_schedule_bh_cb``). While ``stop`` holds the main loop at its gate (the replica's
``stop`` holds the main loop too, so that ``step`` can run it one iteration at a time), the
gate runs the dispatcher instead.

``stop`` holds both QEMU threads: the main loop after its current ``main_loop_wait`` (with
the Big QEMU Lock dropped) and the vCPU thread before its next KVM_RUN. As pause_all_vcpus
does, it signals a vCPU thread that is inside KVM_RUN (SIG_IPI): KVM makes the guest exit and
KVM_RUN return KVM_EXIT_INTR, so the whole VM pauses. ``-S`` (``--wait-attach``) is the
prelaunch state: the vCPU thread does not issue its first KVM_RUN until ``cont``. HMP runs in
the monitor's own threads: its info commands take the BQL when they can get it within 50 ms
and read without it otherwise, so they answer while the process is blocked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from common.cpus import SIG_IPI, Gate
from common.monitor.misc import register_memory_dump
from common.monitor.monitor import Monitor
from common.monitor.qmp import QmpMonitor
from qemuproc.aio import aio_bh_new, qemu_bh_schedule
from qemuproc.kvm_all import KvmError
from qemuproc.monitor_info import register_info
from qemuproc.virtio_qmp import register_virtio_qmp

if TYPE_CHECKING:
    from qemuproc.machine import Machine

BQL_WAIT_S = 0.05


class QemuMonitor:
    """The monitors of one QEMU process (``m`` is its Machine)."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        ml = m.main_loop
        self.mon = mon = Monitor("qemu", m.rt.rundir)
        mon.table.aliases["q"] = "quit"
        self.qmp = QmpMonitor(mon)
        self.qmp.dispatcher_wake = self.qmp_dispatcher_co_wake
        self.co_schedule_bh = aio_bh_new(ml.ctx, self.co_schedule_bh_cb, None,
                                         "co_schedule_bh")
        m.bhs.append(self.co_schedule_bh)
        self.shutdown_requested = False
        self.main_gate = gate = Gate("main-loop")
        gate.on_park = ml.bql.release
        gate.on_unpark = ml.bql.acquire
        gate.nudge = ml.qemu_notify_event
        gate.on_arm = self._arm_main_loop
        gate.idle_check = self._dispatch_pending  # a request that came as the loop parked
        self._hook: Callable[[], None] | None = ml.on_iteration
        m.cpu.gate.nudge = self._kick_vcpu
        mon.gates += [gate, m.cpu.gate]
        mon.step_gate = gate
        mon.stats = self.stats
        mon.status_info = self.status_info
        if m.rt.cfg.options.get("wait_attach"):
            mon.prelaunch = True
            m.cpu.gate.request_stop(nudge=False)
        register_virtio_qmp(mon, m.n, self.bql)
        register_info(mon, m, self.bql)
        register_memory_dump(mon, m.mem.dma_memory_read)
        self._register()
        mon.start()

    # -- where QMP commands run -----------------------------------------------------------------

    def qmp_dispatcher_co_wake(self) -> None:
        """From the monitor's I/O thread: have the main loop run the queued requests."""
        qemu_bh_schedule(self.co_schedule_bh)
        if self.main_gate.stopped:
            self.main_gate.post(self._dispatch_at_gate)

    def co_schedule_bh_cb(self, opaque: Any) -> None:
        self.qmp.monitor_qmp_dispatcher_co()

    def _dispatch_at_gate(self, frame: FrameType) -> bool:
        """The main loop is held: it runs the requests at its gate, and stays held."""
        self._dispatch_pending()
        return False

    def _dispatch_pending(self) -> None:
        if self.qmp.requests:
            with self.m.main_loop.bql:
                self.qmp.monitor_qmp_dispatcher_co()

    def _arm_main_loop(self, armed: bool) -> None:
        """The main loop calls its on_iteration hook only while the gate is armed."""
        hook = self._hook
        if not armed:
            self.m.main_loop.on_iteration = hook
        elif hook is None:
            self.m.main_loop.on_iteration = self.main_gate.wait
        else:
            def both() -> None:
                self.main_gate.wait()
                hook()

            self.m.main_loop.on_iteration = both

    def _kick_vcpu(self) -> None:
        """qemu_cpu_kick: a vCPU thread inside KVM_RUN is signalled out of it."""
        if not self.m.cpu.gate.parked:
            try:
                self.m.kvm.kvm_vm_ioctl(SIG_IPI, self.m.cpu.cpu_index)
            except KvmError:
                pass

    def close(self) -> None:
        """The main loop has ended (main_loop_should_exit): SHUTDOWN with its cause, then
        close. The guest's triple fault is a reset request that -no-reboot makes a shutdown."""
        if self.shutdown_requested:
            cause = (False, "host-qmp-quit")
        elif self.m.cpu.shutdown_requested:
            cause = (True, "guest-reset")
        elif self.m.rt.stopping:
            cause = (False, "host-signal")
        else:
            cause = None
        if cause is not None:
            self.mon.qapi_event_send("SHUTDOWN", {"guest": cause[0], "reason": cause[1]})
        self.mon.close()

    @contextlib.contextmanager
    def bql(self) -> Iterator[None]:
        lock = self.m.main_loop.bql
        got = lock.acquire(timeout=BQL_WAIT_S)
        try:
            yield
        finally:
            if got:
                lock.release()

    # -- state ----------------------------------------------------------------------------------

    def status_info(self) -> dict[str, Any]:
        mem = self.m.mem
        return {"ram": {"name": mem.name, "size": mem.size}}

    def stats(self) -> dict[str, Any]:
        with self.bql():
            return self.m.report()

    def _register(self) -> None:
        m = self.m

        @self.mon.command("quit", hmp="quit",
                          help="quit the emulator: QEMU exits, KVM destroys the VM, the guest "
                               "ends")
        def quit_() -> None:
            def shutdown() -> None:  # qemu_system_shutdown_request(HOST_QMP_QUIT)
                self.shutdown_requested = True
                m.rt.tell("quit")
                m.main_loop.quit = True
                self.main_gate.release()
                m.main_loop.qemu_notify_event()

            self.mon.after_reply(shutdown)


def qemu_monitor(m: Machine) -> QemuMonitor:
    """Build and start QEMU's monitors for machine ``m`` (before its vCPU thread starts)."""
    return QemuMonitor(m)
