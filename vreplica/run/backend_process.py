"""The fourth process of a ``--netdev vhost-user`` run without a socket of the user's: the
replica's vhost-user back end (``python -m vhostuserproc``, vhost-user-bridge) listening on
the run's ``vhost-user.sock``, started before QEMU (which connects as a client with
``reconnect=1``), stopped after it, and killed with the supervisor (PR_SET_PDEATHSIG).

Not part of the replicated system: the supervisor's hand on one more process.
"""

from __future__ import annotations

import ctypes
import json
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.ipc import RunConfig

SOCKET_NAME = "vhost-user.sock"
REPORT_NAME = "report.vhost-user.json"
READY_TIMEOUT_S = 15.0
STOP_GRACE_S = 3.0
PR_SET_PDEATHSIG = 1


class BackendFailed(Exception):
    """The back end did not come up: the one line the run ends with."""


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class BackendProcess:
    """vhostuserproc serving the run's socket; its summary lands in the run directory."""

    def __init__(self, cfg: RunConfig, netdev: str, queues: int, poll: bool,
                 env: dict[str, str]) -> None:
        rundir = Path(cfg.rundir)
        self.socket = rundir / SOCKET_NAME
        self.report_path = rundir / REPORT_NAME
        argv = [sys.executable, "-m", "vhostuserproc", "--server", "--socket", str(self.socket),
                "--netdev", netdev, "--queues", str(queues), "--run", str(rundir),
                "--summary-json", str(self.report_path)] + (["--poll"] if poll else [])
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, text=True, process_group=0,
                                     preexec_fn=_die_with_parent)
        self.ready_line = self._wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self) -> str:
        """Its one line saying it listens; a back end that exits first fails the run."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if line:
                    return line.strip()
            rc = self.proc.poll()
            if rc is not None:
                raise BackendFailed(f"vhost-user backend process (pid {self.pid}) failed: "
                                    f"exit status {rc}")
        self.kill()
        raise BackendFailed(f"vhost-user backend process (pid {self.pid}) did not listen "
                            f"within {READY_TIMEOUT_S:g} s")

    def chardev(self) -> dict[str, Any]:
        """QEMU's ``-chardev socket,id=c0,path=<run>/vhost-user.sock,reconnect=1``."""
        return {"id": "c0", "path": str(self.socket), "server": False, "wait": True,
                "reconnect": 1}

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        """SIGTERM (it prints and writes its summary), then SIGKILL after the grace."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def report(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            return None
