"""Stands for monitor/monitor.c: one process's monitor, its command table, the VM's run state
(softmmu/runstate.c's vm_stop / vm_start) and the QMP events it sends.

Every replica process has a human monitor (HMP, common/monitor/hmp.py) on
``<rundir>/monitor.<role>.sock``; QEMU's process also has a QMP monitor
(common/monitor/qmp.py) on ``<rundir>/qmp.sock``. Both run commands from the one
``CommandTable``. The loops are held through gates (common/cpus.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import trace
from common.cpus import Gate
from common.monitor.commands import Arg, Command, CommandTable, MonitorError, hmp_bind
from common.monitor.hmp import HmpMonitor
from common.monitor.misc import register_common

if TYPE_CHECKING:
    from common.monitor.qmp import QmpMonitor

STOP_SETTLE_S = 0.5
STEP_TIMEOUT_S = 2.0


def socket_path(rundir: str | Path, role: str) -> Path:
    """The human monitor's socket (``-monitor unix:PATH,server``)."""
    return Path(rundir) / f"monitor.{role}.sock"


def qmp_path(rundir: str | Path) -> Path:
    """QEMU's QMP socket (``-qmp unix:PATH,server``)."""
    return Path(rundir) / "qmp.sock"


def pid_path(rundir: str | Path, role: str) -> Path:
    return Path(rundir) / f"pid.{role}"


class Monitor:
    """One process's monitor: its command table, its gates, its HMP and QMP servers."""

    def __init__(self, role: str, rundir: str | Path) -> None:
        self.role = role
        self.rundir = Path(rundir)
        self.table = CommandTable(aliases={"c": "cont"})
        self.gates: list[Gate] = []
        self.step_gate: Gate | None = None
        self.stats: Callable[[], dict] = dict
        self.status_info: Callable[[], dict] = dict
        self.stepping = threading.Lock()
        self.debugging = False
        self.prelaunch = False
        self.hmp: HmpMonitor = HmpMonitor(self)
        self.qmp: QmpMonitor | None = None
        self._after_reply = threading.local()
        register_common(self)

    # -- the command table ----------------------------------------------------------------------

    def command(self, name: str | None = None, *, hmp: str | None = None, qmp: bool = True,
                args: tuple[Arg, ...] = (), params: str = "", help: str = "",
                human: Callable[[Any], str] | None = None,
                hmp_fn: Callable[..., Any] | None = None) -> Callable:
        """Decorator: ``fn(**args) -> data`` as QMP command ``name`` and/or HMP command
        ``hmp`` (an HMP-only command passes ``qmp=False`` and may leave ``name`` out)."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.table.register(Command(name or hmp or fn.__name__, fn, hmp, qmp, args, params,
                                        help, human, hmp_fn))
            return fn

        return register

    def hmp_execute(self, line: str) -> tuple[Command, Any]:
        """Run one HMP line; the command and its data."""
        cmd, words = self.table.hmp_lookup(line)
        data = (cmd.hmp_fn or cmd.fn)(**hmp_bind(cmd, words))
        return cmd, {} if data is None else data

    def after_reply(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the current command's reply is on its way (e.g. quit)."""
        self._after_reply.fn = fn

    def take_after_reply(self) -> Callable[[], None] | None:
        fn = getattr(self._after_reply, "fn", None)
        self._after_reply.fn = None
        return fn

    # -- the VM's run state ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return not any(g.stopped for g in self.gates)

    def run_state(self) -> str:
        """QEMU's RunState names: running, paused, prelaunch (-S), debug (in pdb)."""
        if self.debugging:
            return "debug"
        if self.prelaunch:
            return "prelaunch"
        return "running" if self.running else "paused"

    def vm_stop(self) -> dict[str, Any]:
        """Hold every loop at its gate; STOP goes out if the VM was running (do_vm_stop).
        Called from a gated thread (QMP runs in the main loop, holding the locks the others
        need to reach their gates), it does not wait for them: they park soon after."""
        was_running = self.run_state() == "running"
        for g in self.gates:
            g.request_stop()
        if was_running:
            self.qapi_event_send("STOP")
        if threading.get_ident() not in {g.thread_ident() for g in self.gates}:
            deadline = time.monotonic() + STOP_SETTLE_S
            for g in self.gates:
                g.wait_parked(max(0.0, deadline - time.monotonic()))
        return {g.name: g.describe() for g in self.gates}

    def vm_start(self) -> None:
        """Release every loop; RESUME goes out unless it was running (vm_prepare_start)."""
        was_running = self.run_state() == "running"
        self.prelaunch = False
        for g in self.gates:
            g.release()
        if not was_running:
            self.qapi_event_send("RESUME")

    def qapi_event_send(self, event: str, data: dict[str, Any] | None = None) -> None:
        """monitor_qapi_event_emit: the event to every QMP client past negotiation."""
        if self.qmp is not None:
            self.qmp.qapi_event_emit(event, data)

    def step(self, count: int) -> dict[str, Any]:
        """While stopped: let the step gate's thread run ``count`` iterations, with every
        trace event on, and return the events that thread produced."""
        gate = self.step_gate
        if gate is None:
            raise MonitorError("this process has no loop to step")
        if not gate.stopped:
            raise MonitorError("the VM is running: 'stop' it first")
        if not gate.parked and not gate.wait_parked(STEP_TIMEOUT_S):
            raise MonitorError(f"{gate.name} has not reached its stop point: {gate.where()}")
        with self.stepping:
            saved = trace.states()
            trace.switch(dict.fromkeys(saved, True))
            records = trace.records()
            start = len(records)
            t0 = time.monotonic_ns()
            done = 0
            finished = True
            try:
                for _ in range(count):
                    finished = gate.step(STEP_TIMEOUT_S)
                    done += 1
                    if not finished:
                        break
            finally:
                trace.switch(saved)
            ident = gate.ident
            events = [{"ts_us": round((r[0] - t0) / 1e3, 1), "name": r[3], "args": r[4]}
                      for r in records[start:] if r[1] == ident and r[2] == "i"]
        data: dict[str, Any] = {"thread": gate.name, "iterations": done, "completed": finished,
                                "events": events}
        if not finished:
            data["where"] = gate.where()
        return data

    # -- the servers ----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on the run directory's sockets and note this process's pid beside them."""
        self.hmp.start(socket_path(self.rundir, self.role))
        if self.qmp is not None:
            self.qmp.start(qmp_path(self.rundir))
        pid_file = pid_path(self.rundir, self.role)
        tmp = pid_file.with_name(f".{pid_file.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.rename(pid_file)

    def close(self) -> None:
        self.hmp.close()
        if self.qmp is not None:
            self.qmp.close()
        try:
            pid_path(self.rundir, self.role).unlink()
        except FileNotFoundError:
            pass
