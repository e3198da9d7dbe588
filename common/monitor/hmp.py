"""Stands for monitor/hmp.c (with util/readline.c's history): the human monitor.

A connection opens with QEMU's banner and the prompt ``(role) ``; each line is an HMP
command from the shared table (common/monitor/commands.py), answered with its text and the
prompt again. Lines typed at the prompt go into the monitor's history, which lives in the
process as QEMU's ReadLineState does, so it outlasts a connection: ``info history`` shows it
and ``vreplica attach`` loads it into the next session.

For ``vreplica attach --json`` and the tests, a line that is a JSON object
``{"execute": "LINE", "format": "json"|"human", "history": true, "id": ...}`` (history:
the line was typed at a prompt) is answered with one JSON line
``{"return": DATA}`` or ``{"error": {"class", "desc"}}``, DATA being what the command's QMP
function returns. That is this tool's record, not QMP: QMP is common/monitor/qmp.py.
``pdb`` turns the connection into a debugger session (common/monitor/debugger.py).
"""

from __future__ import annotations

import json
import socket
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.monitor.chardev import SocketChardev
from common.monitor.commands import Command, MonitorError
from common.monitor.debugger import pdb_session

if TYPE_CHECKING:
    from common.monitor.monitor_internal import Monitor

READLINE_MAX_CMDS = 64


def banner(role: str) -> str:
    who = "QEMU 7.2.0" if role == "qemu" else f"vreplica {role}"
    return f"{who} monitor - type 'help' for more information\n"


def format_human(data: Any, indent: int = 0) -> str:
    """A reply shown as HMP would: ``key: value`` lines, nested blocks indented."""
    pad = "  " * indent
    if isinstance(data, dict):
        lines = []
        for k, v in data.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{k}:")
                lines.append(format_human(v, indent + 1))
            else:
                lines.append(f"{pad}{k}: {v}")
        return "\n".join(lines)
    if isinstance(data, list):
        return "\n".join(format_human(v, indent) if isinstance(v, dict | list)
                         else f"{pad}{v}" for v in data)
    return f"{pad}{data}"


def hmp_text(cmd: Command, data: Any) -> str:
    """What the HMP command prints for its data."""
    if cmd.human is not None:
        return cmd.human(data)
    if data is None or data == {}:
        return ""
    return data if isinstance(data, str) else format_human(data)


class HmpMonitor:
    """The HMP server of one process's monitor, and its command-line history."""

    def __init__(self, mon: Monitor) -> None:
        self.mon = mon
        self.prompt = f"({mon.role}) "
        self.history: deque[str] = deque(maxlen=READLINE_MAX_CMDS)
        self._chardev: SocketChardev | None = None

    def start(self, path: Path) -> None:
        self._chardev = SocketChardev(path, f"monitor:{self.mon.role}", self._serve)
        self._chardev.start()

    def close(self) -> None:
        if self._chardev is not None:
            self._chardev.close()

    def readline_hist_add(self, line: str) -> None:
        """A line already in the history moves to its end."""
        if not line:
            return
        try:
            self.history.remove(line)
        except ValueError:
            pass
        self.history.append(line)

    def handle_hmp_command(self, line: str) -> str:
        """One line's text, errors included, as the prompt shows it."""
        try:
            cmd, data = self.mon.hmp_execute(line)
            return hmp_text(cmd, data)
        except MonitorError as e:
            return f"Error: {e.desc}"
        except Exception as e:  # noqa: BLE001 - a monitor bug must not kill the process
            return f"Error: {type(e).__name__}: {e}"

    # -- a connection ---------------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        stream = conn.makefile("rw", encoding="utf-8", errors="replace", newline="\n")
        try:
            stream.write(banner(self.mon.role) + self.prompt)
            stream.flush()
            while True:
                line = stream.readline()
                if not line:
                    return
                line = line.strip()
                if line.startswith("{"):
                    if self._serve_json(stream, line):
                        return
                elif line.split(None, 1)[:1] == ["pdb"]:
                    self.readline_hist_add(line)
                    self._run_pdb(stream)
                    return
                else:
                    self.readline_hist_add(line)
                    text = self.handle_hmp_command(line) if line else ""
                    stream.write(text + ("\n" if text and not text.endswith("\n") else "")
                                 + self.prompt)
                    stream.flush()
                    self._run_after_reply()
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _serve_json(self, stream: Any, line: str) -> bool:
        """One ``{"execute": LINE}`` record; True when the connection is over (pdb)."""
        try:
            req = json.loads(line)
            cmdline = req["execute"]
            if not isinstance(cmdline, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._send(stream, {"error": {"class": "GenericError",
                                          "desc": "expected {\"execute\": \"COMMAND LINE\"}"}})
            return False
        ident = {"id": req["id"]} if "id" in req else {}
        human = req.get("format") == "human"
        if req.get("history") is True:
            self.readline_hist_add(cmdline.strip())
        if cmdline.split(None, 1)[:1] == ["pdb"]:
            self._send(stream, {"return": {"pdb": self.mon.role}, **ident})
            self._run_pdb(stream)
            return True
        try:
            cmd, data = self.mon.hmp_execute(cmdline)
            out = {"return": hmp_text(cmd, data) if human else data, **ident}
        except MonitorError as e:
            out = {"error": {"class": e.cls, "desc": e.desc}, **ident}
        except Exception as e:  # noqa: BLE001
            out = {"error": {"class": "GenericError", "desc": f"{type(e).__name__}: {e}"},
                   **ident}
        self._send(stream, out)
        self._run_after_reply()
        return False

    def _run_pdb(self, stream: Any) -> None:
        try:
            pdb_session(self.mon, stream)
        except MonitorError as e:
            stream.write(f"Error: {e.desc}\n")
        stream.flush()

    def _run_after_reply(self) -> None:
        fn = self.mon.take_after_reply()
        if fn is not None:
            fn()

    @staticmethod
    def _send(stream: Any, obj: dict) -> None:
        stream.write(json.dumps(obj, default=str) + "\n")
        stream.flush()
