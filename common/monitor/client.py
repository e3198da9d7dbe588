"""The client side of a process's human monitor (what ``vreplica attach`` and one process
asking another use): one connection, requests as ``{"execute": "LINE"}`` records
(common/monitor/hmp.py). QMP clients use the ``qemu.qmp`` library instead.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from common.monitor.commands import MonitorError
from common.monitor.monitor import socket_path

BANNER_MAX = 4096


class MonitorConnection:
    """A connection to one process's HMP socket, past its banner and first prompt."""

    def __init__(self, path: str | Path, timeout: float | None = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        seen = b""
        while not seen.endswith(b") "):
            data = self.sock.recv(1)
            if not data or len(seen) > BANNER_MAX:
                raise ConnectionError(f"{path}: the monitor closed the connection")
            seen += data
        self.banner, _, prompt = seen.decode().rpartition("\n")
        self.prompt = prompt
        self.stream = self.sock.makefile("rw", encoding="utf-8", errors="replace",
                                         newline="\n")

    def request(self, cmdline: str, human: bool = False, history: bool = False) -> dict:
        """The raw reply: ``{"return": ...}`` or ``{"error": {...}}``. ``history``: the
        line was typed at a prompt and goes into the monitor's history."""
        req: dict[str, Any] = {"execute": cmdline}
        if human:
            req["format"] = "human"
        if history:
            req["history"] = True
        self.stream.write(json.dumps(req) + "\n")
        self.stream.flush()
        line = self.stream.readline()
        if not line:
            raise ConnectionError("the monitor closed the connection")
        return json.loads(line)

    def execute(self, cmdline: str, human: bool = False) -> Any:
        """The reply's ``return``; an error raises MonitorError."""
        rep = self.request(cmdline, human)
        if "error" in rep:
            raise MonitorError(rep["error"]["desc"], rep["error"]["class"])
        return rep["return"]

    def close(self) -> None:
        try:
            self.stream.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> MonitorConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def query(rundir: str | Path, role: str, cmdline: str, timeout: float = 2.0) -> Any:
    """Run one command line in ``role``'s monitor; returns its data."""
    with MonitorConnection(socket_path(rundir, role), timeout) as c:
        return c.execute(cmdline)
