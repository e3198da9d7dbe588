"""No QEMU counterpart (QEMU offers gdbstub for this): a real pdb inside a replica process,
on a monitor connection, stopped in that process's loop thread.

The thread takes the session at its gate (common/cpus.py) and pdb stops at the next line of
its loop; a thread that does not come round (blocked on IPC) is held where it is instead, and
pdb shows its stack from the monitor's thread. Continuing or quitting resumes the process.
"""

from __future__ import annotations

import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from common.cpus import PARK_TICK_S, thread_frame, thread_where
from common.monitor.commands import MonitorError

if TYPE_CHECKING:
    from common.monitor.monitor_internal import Monitor

PDB_PICKUP_S = 1.0
PDB_SKIP = ["threading", "common.cpus", "common.monitor.*", "bdb", "pdb"]


def _make_pdb(stream: Any, done: threading.Event) -> Any:
    import pdb

    class MonitorPdb(pdb.Pdb):
        """pdb on the monitor connection: continuing or quitting resumes the process."""

        def __init__(self) -> None:
            super().__init__(stdin=stream, stdout=stream, skip=PDB_SKIP, nosigint=True,
                             readrc=False)
            self.prompt = "(Pdb) "

        def do_continue(self, arg: str) -> int:
            r = super().do_continue(arg)
            if not self.breaks:
                done.set()
            return r

        do_c = do_cont = do_continue

        def do_quit(self, arg: str) -> int:
            """q(uit): leave the debugger; the process runs on."""
            self.clear_all_breaks()
            return self.do_continue(arg)

        do_q = do_exit = do_quit

        def do_EOF(self, arg: str) -> int:
            return self.do_quit(arg)

        def _unavailable(self, arg: str) -> None:
            self.error("not available over the monitor")

        do_run = do_restart = do_interact = _unavailable

    return MonitorPdb()


class _SessionStream:
    """The debugger's file: an error on the connection reads as EOF (pdb then resumes the
    process) instead of raising into the debugged thread."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, s: str) -> int:
        try:
            return self._f.write(s)
        except (OSError, ValueError):
            return len(s)

    def flush(self) -> None:
        try:
            self._f.flush()
        except (OSError, ValueError):
            pass

    def readline(self, *args: Any) -> str:
        try:
            return self._f.readline(*args)
        except (OSError, ValueError):
            return ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def pdb_session(mon: Monitor, stream: Any) -> None:
    """A pdb session on the step gate's thread, over ``stream``; returns when it ends."""
    gate = mon.step_gate
    if gate is None:
        raise MonitorError("this process has no loop to debug")
    stream = _SessionStream(stream)
    done = threading.Event()
    dbg = _make_pdb(stream, done)
    started = threading.Event()

    def in_thread(frame: FrameType) -> bool:
        stream.write(f"pdb: {gate.name} stops at the next line of its loop; "
                     "'c' resumes it, 'q' leaves the debugger\n")
        stream.flush()
        started.set()
        dbg.set_trace(frame)
        dbg.set_next(frame)
        return True

    mon.debugging = True
    try:
        gate.post(in_thread)
        if started.wait(PDB_PICKUP_S) or not gate.withdraw(in_thread):
            while not done.wait(PARK_TICK_S):
                if gate.thread_ident() not in {t.ident for t in threading.enumerate()}:
                    return
            return
        ident = gate.thread_ident()
        frame = thread_frame(ident)
        if frame is None:
            raise MonitorError(f"{gate.name}: thread not found")
        was_stopped = gate.stopped
        if not was_stopped:
            gate.request_stop()
        stream.write(f"pdb: {gate.name} is blocked in {thread_where(ident)}; here is its "
                     "stack (it is held until you continue)\n")
        stream.flush()
        try:
            dbg.reset()
            dbg.interaction(frame, None)
        finally:
            sys.settrace(None)
            if not was_stopped:
                gate.release()
    finally:
        mon.debugging = False
