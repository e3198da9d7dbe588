"""What every replica process does around its real work: find the run, die with its
supervisor, turn SIGTERM into an orderly exit, report to the supervisor, dump its trace.

Not part of the replicated system; the process plumbing the three share.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from common import channel, trace
from common.channel import Channel
from common.ipc import (
    RunConfig,
    process_alive,
    run_alive,
    run_owner,
    unlink_entries,
    unlink_objects,
)

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


class Stop(Exception):
    """SIGTERM/SIGINT: leave the loop and exit in order."""


class ProcessRuntime:
    def __init__(self, role: str, rundir: str) -> None:
        self.role = role
        try:
            self.cfg = RunConfig.load(rundir)
        except FileNotFoundError:  # the run was taken down before this process got going
            rid = Path(rundir).name
            owner = run_owner(rid)
            if owner is None or not process_alive(*owner):
                unlink_entries(rid)  # what is left of it (its network namespace too)
            raise SystemExit(1) from None
        self.rundir = Path(rundir)
        self.stopping = False
        self._armed = False
        os.umask(0o077)  # what the process writes in the run directory (or a pcap) is private
        # the handler first: a SIGTERM from here on (PDEATHSIG included) ends in finish()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked in the supervisor
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the supervisor
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(f"{role}proc".encode()), 0, 0, 0)
        if os.getppid() != self.cfg.supervisor_pid or self.stopping:
            self.finish()  # the supervisor died before prctl, or we were stopped meanwhile
            raise SystemExit(0 if self.stopping else 1)
        self.ctl = Channel(self.cfg.channel("ctl"))
        trace.register_thread(f"{role}")
        sys.excepthook = self._excepthook
        channel.on_interrupt = self._on_interrupt
        self._armed = True
        if self.stopping:
            self.finish()
            raise SystemExit(0)

    def _on_interrupt(self) -> None:
        """A wait was cut short by a signal: if it was ours, stop (the main thread only)."""
        if self.stopping and self._armed and threading.current_thread() is threading.main_thread():
            raise Stop

    def _excepthook(self, kind: type[BaseException], value: BaseException, tb: Any) -> None:
        """A Stop that escaped the main loop's try (it came just before or after): no trace."""
        if issubclass(kind, Stop):
            self.finish()
            return
        sys.__excepthook__(kind, value, tb)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stopping:  # one Stop is enough; a second would break the orderly exit
            return
        self.stopping = True
        if self._armed:
            raise Stop

    def tell(self, kind: str, **fields: Any) -> None:
        """A short record to the supervisor (ready, done, error)."""
        try:
            self.ctl.send_raw(trace_pack([kind, self.role, fields]), timeout=1.0)
        except Exception:
            pass

    def report(self, data: dict) -> None:
        path = self.rundir / f"report.{self.role}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1, default=str))
            tmp.rename(path)
        except FileNotFoundError:  # the run directory is gone: the run is over
            pass

    def finish(self) -> None:
        """At exit: dump the trace; if the supervisor is gone (killed: PDEATHSIG brought us
        here), remove the run's objects and directory, as its cleanup would have."""
        if trace.ENABLED:
            try:
                trace.dump(self.rundir / f"trace.{self.role}.msgpack", self.role)
            except OSError:
                pass
        if not run_alive(self.cfg):
            unlink_objects(self.cfg)
            shutil.rmtree(self.rundir, ignore_errors=True)

    def fail(self, message: str) -> None:
        self.tell("error", message=message)
        print(f"{self.role}proc: {message}", file=sys.stderr)


def trace_pack(obj: Any) -> bytes:
    from common.kvm_abi import packb

    return packb(obj)
