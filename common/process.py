"""What every replica process does around its real work: find the run, die with its
supervisor, turn SIGTERM into an orderly exit, report to the supervisor, dump its trace.

Not part of the replicated system; the process plumbing the three share.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from common import trace
from common.channel import Channel
from common.ipc import RunConfig, run_alive, unlink_objects

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


class Stop(Exception):
    """SIGTERM/SIGINT: leave the loop and exit in order."""


class ProcessRuntime:
    def __init__(self, role: str, rundir: str) -> None:
        self.role = role
        self.cfg = RunConfig.load(rundir)
        self.rundir = Path(rundir)
        self.stopping = False
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(f"{role}proc".encode()), 0, 0, 0)
        if os.getppid() != self.cfg.supervisor_pid:  # the supervisor died before prctl
            raise SystemExit(1)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the supervisor
        self.ctl = Channel(self.cfg.channel("ctl"))
        trace.register_thread(f"{role}")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True
        raise Stop

    def tell(self, kind: str, **fields: Any) -> None:
        """A short record to the supervisor (ready, done, error)."""
        try:
            self.ctl.send_raw(trace_pack([kind, self.role, fields]), timeout=1.0)
        except Exception:
            pass

    def report(self, data: dict) -> None:
        path = self.rundir / f"report.{self.role}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.rename(path)

    def finish(self) -> None:
        """At exit: dump the trace; if the supervisor is gone, remove the run's objects."""
        if trace.ENABLED:
            try:
                trace.dump(self.rundir / f"trace.{self.role}.msgpack", self.role)
            except OSError:
                pass
        if not run_alive(self.cfg):
            unlink_objects(self.cfg)

    def fail(self, message: str) -> None:
        self.tell("error", message=message)
        print(f"{self.role}proc: {message}", file=sys.stderr)


def trace_pack(obj: Any) -> bytes:
    from common.kvm_abi import packb

    return packb(obj)
