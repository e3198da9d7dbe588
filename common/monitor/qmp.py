"""Stands for monitor/qmp.c and monitor/qmp-cmds-control.c: the QEMU Machine Protocol.

As QEMU 7.2 does on a socket chardev, the monitor's I/O thread (``IO mon_iothread``) reads
the socket, splits the byte stream into JSON messages (qobject/json-streamer.c) and queues
each request (``handle_qmp_command``); the dispatcher (``monitor_qmp_dispatcher_co``) takes
them off the queue and runs them where the process says: QEMU's runs it in its main loop,
with the Big QEMU Lock held (qemuproc/monitor.py). Without out-of-band enabled a monitor is
suspended while its one request waits, so requests run in order; with it, up to
``QMP_REQ_QUEUE_LEN_MAX`` wait, and ``exec-oob`` runs a command that allows it at once in the
I/O thread (no command here allows it, as for most of QEMU's).

A connection opens with the greeting, and only ``qmp_capabilities`` is accepted until it has
run. Events (``STOP``, ``RESUME``, ``SHUTDOWN``) go to every connection past that point.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.monitor.chardev import SocketChardev
from common.monitor.commands import (
    Arg,
    Command,
    CommandTable,
    MonitorError,
    qmp_dispatch,
    qmp_error_response,
)
from common.trace import register_thread, trace_event

if TYPE_CHECKING:
    from common.monitor.monitor_internal import Monitor

trace_handle_qmp_command = trace_event("handle_qmp_command")
trace_monitor_qmp_cmd_in_band = trace_event("monitor_qmp_cmd_in_band")
trace_monitor_qmp_respond = trace_event("monitor_qmp_respond")

MONITOR_QMP_ADDR = 0x55D0_A4E1_2000
MONITOR_QMP_SIZE = 0x2C0
"""The fake addresses trace events give a connection's MonitorQMP (``mon %p``), one apart."""

QMP_REQ_QUEUE_LEN_MAX = 8
MAX_TOKEN_SIZE = 64 << 20
MAX_NESTING = 1024
RECV_SIZE = 65536
SEND_TIMEOUT_S = 5
"""A client that stops reading is dropped after this long, rather than stalling the main
loop that sends it a reply or an event."""


class JsonMessageParser:
    """qobject/json-streamer.c: complete top-level JSON values out of a byte stream, by
    counting brackets outside strings; a value split across reads waits for the rest."""

    def __init__(self) -> None:
        self.buf: list[str] = []
        self.size = 0
        self.depth = 0
        self.in_string = False
        self.escape = False

    def feed(self, text: str) -> list[tuple[Any, MonitorError | None]]:
        out: list[tuple[Any, MonitorError | None]] = []
        for ch in text:
            if not self.buf and ch in " \t\r\n":
                continue
            self.buf.append(ch)
            self.size += 1
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
            complete = (self.depth <= 0 and not self.in_string
                        and (ch in "}]" or (self.depth == 0 and ch == "\n")))
            if self.size > MAX_TOKEN_SIZE or self.depth > MAX_NESTING:
                out.append((None, MonitorError("JSON parse error, message too large or "
                                               "too deeply nested")))
                self._reset()
            elif complete:
                out.append(self._message())
        return out

    def _message(self) -> tuple[Any, MonitorError | None]:
        text = "".join(self.buf)
        self._reset()
        try:
            return json.loads(text), None
        except ValueError as e:
            return None, MonitorError(f"JSON parse error, {e}")

    def _reset(self) -> None:
        self.buf = []
        self.size = 0
        self.depth = 0
        self.in_string = False
        self.escape = False


class MonitorQMP:
    """One QMP connection: its negotiation state and capabilities, and its output."""

    def __init__(self, sock: socket.socket, seq: int) -> None:
        self.sock = sock
        self.addr = hex(MONITOR_QMP_ADDR + MONITOR_QMP_SIZE * seq)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", SEND_TIMEOUT_S, 0))
        self.negotiated = False
        self.oob = False
        self.parser = JsonMessageParser()
        self.resumed = threading.Event()
        self.resumed.set()
        self.open = True
        self._wlock = threading.Lock()

    def qmp_send_response(self, rsp: dict) -> None:
        text = json.dumps(rsp, default=str)
        if trace_monitor_qmp_respond.on:
            trace_monitor_qmp_respond(mon=self.addr, json=text)
        data = (text + "\n").encode()
        with self._wlock:
            if not self.open:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.open = False


class QmpMonitor:
    """The QMP server of QEMU's monitor. ``dispatcher_wake`` makes the dispatcher run
    (qmp_dispatcher_co_wake); by default it runs in the I/O thread itself."""

    def __init__(self, mon: Monitor) -> None:
        self.mon = mon
        self.dispatcher_wake: Callable[[], None] = self.monitor_qmp_dispatcher_co
        self.requests: deque[tuple[MonitorQMP, Any, MonitorError | None]] = deque()
        self.conns: list[MonitorQMP] = []
        self._lock = threading.Lock()
        self._opened = 0
        self._cur = threading.local()
        self._chardev: SocketChardev | None = None
        self.negotiation = CommandTable()
        self._register()
        mon.qmp = self

    def start(self, path: Path) -> None:
        self._chardev = SocketChardev(path, "IO mon_iothread", self._serve)
        self._chardev.start()

    def close(self) -> None:
        if self._chardev is not None:
            self._chardev.close()
        with self._lock:
            conns = list(self.conns)
        for c in conns:
            c.open = False
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def monitor_cur(self) -> MonitorQMP:
        """The connection whose command is running."""
        return self._cur.conn

    # -- the I/O thread -------------------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        register_thread()
        with self._lock:
            self._opened += 1
            conn = MonitorQMP(sock, self._opened)
        conn.qmp_send_response({"QMP": {"version": self.mon.table.by_name["query-version"].fn(),
                                        "capabilities": ["oob"]}})
        with self._lock:
            self.conns.append(conn)
        try:
            while conn.open:
                conn.resumed.wait()
                data = sock.recv(RECV_SIZE)
                if not data:
                    return
                for req, err in conn.parser.feed(data.decode("utf-8", "replace")):
                    self.handle_qmp_command(conn, req, err)
        finally:
            conn.open = False
            with self._lock:
                self.conns.remove(conn)

    def handle_qmp_command(self, conn: MonitorQMP, req: Any, err: MonitorError | None) -> None:
        if trace_handle_qmp_command.on and err is None:
            trace_handle_qmp_command(mon=conn.addr, req=json.dumps(req, default=str))
        if (err is None and conn.oob and isinstance(req, dict) and "exec-oob" in req
                and "execute" not in req):
            self._dispatch(conn, req)
            return
        with self._lock:
            waiting = sum(1 for c, _, _ in self.requests if c is conn)
            if not conn.oob or waiting == QMP_REQ_QUEUE_LEN_MAX - 1:
                conn.resumed.clear()  # monitor_suspend
            self.requests.append((conn, req, err))
        self.dispatcher_wake()

    # -- the dispatcher -------------------------------------------------------------------------

    def monitor_qmp_dispatcher_co(self) -> None:
        """Run every queued request, in order; each connection resumes when its is done."""
        while True:
            with self._lock:
                if not self.requests:
                    return
                conn, req, err = self.requests.popleft()
            if err is not None:
                conn.qmp_send_response(qmp_error_response(err))
            else:
                if trace_monitor_qmp_cmd_in_band.on:
                    trace_monitor_qmp_cmd_in_band(
                        id=json.dumps(req["id"]) if isinstance(req, dict) and "id" in req
                        else "")
                self._dispatch(conn, req)
            conn.resumed.set()  # monitor_resume
            fn = self.mon.take_after_reply()
            if fn is not None:
                fn()

    def _dispatch(self, conn: MonitorQMP, req: Any) -> None:
        """monitor_qmp_dispatch: before negotiation only qmp_capabilities exists."""
        table = self.mon.table if conn.negotiated else self.negotiation
        self._cur.conn = conn
        try:
            rsp = qmp_dispatch(table, req, conn.oob)
        finally:
            self._cur.conn = None
        if not conn.negotiated and rsp.get("error", {}).get("class") == "CommandNotFound":
            rsp["error"]["desc"] = "Expecting capabilities negotiation with 'qmp_capabilities'"
        conn.qmp_send_response(rsp)

    # -- events ---------------------------------------------------------------------------------

    def qapi_event_emit(self, event: str, data: dict[str, Any] | None) -> None:
        now = time.time_ns() // 1000
        msg: dict[str, Any] = {"timestamp": {"seconds": now // 1_000_000,
                                             "microseconds": now % 1_000_000},
                               "event": event}
        if data is not None:
            msg["data"] = data
        with self._lock:
            conns = [c for c in self.conns if c.negotiated]
        for c in conns:
            c.qmp_send_response(msg)

    # -- the control commands -------------------------------------------------------------------

    def _register(self) -> None:
        mon = self.mon

        def qmp_capabilities(enable: list | None = None) -> dict:
            conn = self.monitor_cur()
            if conn.negotiated:
                raise MonitorError("Capabilities negotiation is already complete, command "
                                   "ignored", "CommandNotFound")
            for cap in enable or []:
                if cap != "oob":
                    raise MonitorError(f"Parameter 'enable' does not accept value '{cap}'")
            conn.oob = "oob" in (enable or [])
            conn.negotiated = True
            return {}

        caps = Command("qmp_capabilities", qmp_capabilities, args=(Arg("enable", "list", True),),
                       help="leave capabilities negotiation")
        self.negotiation.register(caps)
        mon.table.register(caps)

        @mon.command("query-commands", help="the QMP commands this monitor has")
        def query_commands() -> list[dict[str, str]]:
            return [{"name": c.name} for c in mon.table.by_name.values() if c.qmp]

        @mon.command("human-monitor-command",
                     args=(Arg("command-line"), Arg("cpu-index", "int", True)),
                     help="run an HMP command line; its text is the reply")
        def human_monitor_command(**kw: Any) -> str:
            text = mon.hmp.handle_hmp_command(kw["command-line"])
            return text + "\n" if text and not text.endswith("\n") else text
