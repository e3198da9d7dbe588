"""``vreplica ps`` and ``vreplica attach``: the running replicas, and a monitor prompt in one
of their processes (QEMU's HMP, over the process's Unix socket in the run directory)."""

from __future__ import annotations

import codecs
import json
import os
import select
import socket
import sys
import time
from typing import Any

import psutil

from common.ipc import RunConfig, live_runs
from common.monitor.client import MonitorConnection
from common.monitor.commands import MonitorError
from common.monitor.monitor import pid_path, qmp_path, socket_path
from vreplica.run.options import Parser

ROLES = ("guest", "kvm", "qemu")
PS_QUERY_TIMEOUT_S = 0.5
PROMPT_IDLE_S = 0.2


class ClientError(Exception):
    """One line for the user, exit status 1."""


# -- finding runs and processes -----------------------------------------------------------------


def find_run(rid: str | None) -> RunConfig:
    """The run ``rid`` names (a unique prefix will do); with no id, the only live run."""
    runs = live_runs()
    if rid:
        hits = [c for c in runs if c.rid.startswith(rid)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise ClientError(f"no running replica with id {rid!r}")
        raise ClientError(f"{rid!r} names several runs: {', '.join(c.rid for c in hits)}")
    if not runs:
        raise ClientError("no running replica (start one with: vreplica run --hold)")
    if len(runs) > 1:
        raise ClientError("several replicas are running; pick one with --run: "
                          + ", ".join(c.rid for c in runs))
    return runs[0]


def role_process(cfg: RunConfig, role: str) -> psutil.Process | None:
    """The run's ``role`` process: from the pid file it wrote, checked against its command
    line; failing that, the supervisor's child running ``-m <role>proc``."""
    def is_ours(p: psutil.Process) -> bool:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            return False
        return f"{role}proc" in cmd and cfg.rundir in cmd

    try:
        p = psutil.Process(int(pid_path(cfg.rundir, role).read_text()))
        if is_ours(p):
            return p
    except (OSError, ValueError, psutil.Error):
        pass
    try:
        for p in psutil.Process(cfg.supervisor_pid).children():
            if is_ours(p):
                return p
    except psutil.Error:
        pass
    return None


def vhost_workers(cfg: RunConfig) -> list[psutil.Process]:
    """The KVM process's vhost-net worker processes (``vhost-<QEMU pid>``, one per device)."""
    kvm = role_process(cfg, "kvm")
    try:
        return [c for c in kvm.children() if c.name().startswith("vhost-")] if kvm else []
    except psutil.Error:
        return []


def process_row(cfg: RunConfig, role: str, p: psutil.Process | None = None
                ) -> dict[str, Any]:
    """``role``'s process (or ``p``, a vhost worker, which has no monitor of its own)."""
    row: dict[str, Any] = {"run": cfg.rid, "role": role, "pid": None, "state": "gone"}
    worker = p is not None
    if p is None:
        p = role_process(cfg, role)
    if p is None:
        return row
    try:
        with p.oneshot():
            cpu = p.cpu_times()
            ctx = p.num_ctx_switches()
            row.update(pid=p.pid, os_status=p.status(), threads=p.num_threads(),
                       cpu_s=round(cpu.user + cpu.system, 2), rss_bytes=p.memory_info().rss,
                       ctx_voluntary=ctx.voluntary, ctx_involuntary=ctx.involuntary,
                       state=p.status())
    except psutil.Error:
        return row
    if worker:
        return row
    try:
        with MonitorConnection(socket_path(cfg.rundir, role), PS_QUERY_TIMEOUT_S) as c:
            row["state"] = c.execute("info status")["status"]
    except (OSError, ValueError, MonitorError):
        pass
    return row


# -- vreplica ps --------------------------------------------------------------------------------


def ps_main(argv: list[str]) -> int:
    ap = Parser(prog="vreplica ps", label="vreplica ps",
                description="the running replicas and their processes")
    ap.add_argument("--json", action="store_true", help="one JSON document")
    a = ap.parse_args(argv)
    try:
        return _ps(a.json)
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _ps(as_json: bool) -> int:
    runs = []
    for cfg in live_runs():
        runs.append({"run": cfg.rid, "rundir": cfg.rundir, "qmp": str(qmp_path(cfg.rundir)),
                     "supervisor_pid": cfg.supervisor_pid,
                     "age_s": round(time.time() - cfg.supervisor_started, 1),
                     "mode": cfg.options.get("mode"),
                     "processes": [process_row(cfg, role) for role in ROLES]
                     + [process_row(cfg, "vhost", w) for w in vhost_workers(cfg)]})
    if as_json:
        print(json.dumps({"runs": runs}, indent=1))
        return 0
    if not runs:
        print("no running replicas")
        return 0
    print(f"{'RUN':<16} {'ROLE':<6} {'PID':>7} {'STATE':<10} {'STAT':<9} {'CPU(s)':>7} "
          f"{'RSS(MiB)':>8} {'CTXSW vol/invol':>16} {'THR':>4}")
    for r in runs:
        for p in r["processes"]:
            if p["pid"] is None:
                print(f"{r['run']:<16} {p['role']:<6} {'-':>7} gone")
                continue
            ctx = f"{p['ctx_voluntary']}/{p['ctx_involuntary']}"
            print(f"{r['run']:<16} {p['role']:<6} {p['pid']:>7} {p['state']:<10} "
                  f"{p['os_status']:<9} {p['cpu_s']:>7.2f} {p['rss_bytes'] / 2**20:>8.1f} "
                  f"{ctx:>16} {p['threads']:>4}")
    return 0


# -- vreplica attach ----------------------------------------------------------------------------


class Session:
    """A monitor prompt: readline editing, history and completion over one connection."""

    def __init__(self, cfg: RunConfig, role: str, as_json: bool) -> None:
        self.cfg = cfg
        self.role = role
        self.as_json = as_json
        self.path = socket_path(cfg.rundir, role)
        self.conn = self._connect()
        self.names: list[str] = []
        self.events: list[str] = []

    def _connect(self) -> MonitorConnection:
        try:
            return MonitorConnection(self.path, timeout=None)
        except (OSError, ValueError) as e:
            raise ClientError(f"cannot reach the {self.role} monitor of run {self.cfg.rid} "
                              f"({self.path}): {e}") from None

    def run_one(self, line: str, history: bool = False) -> bool:
        """Run one command line and print its reply; False if it failed. ``history``: the
        line was typed at the prompt, so it goes into the monitor's history."""
        if not line.strip():
            return True
        if line.split(None, 1)[0] == "pdb":
            self.pdb()
            return True
        try:
            rep = self.conn.request(line, human=not self.as_json, history=history)
        except (OSError, ValueError) as e:
            if line.split()[0] in ("quit", "q") and self.role == "qemu":
                return True
            raise ClientError(f"the {self.role} monitor went away: {e}") from None
        if self.as_json:
            print(json.dumps(rep, indent=1))
            return "error" not in rep
        if "error" in rep:
            print(f"Error: {rep['error']['desc']}", file=sys.stderr)
            return False
        text = rep["return"]
        if text:
            print(text.rstrip("\n"))
        return True

    # -- pdb: bridge the terminal to the debugger on the socket ---------------------------------

    def pdb(self) -> None:
        """A pdb session in the process, on a connection of its own; its prompts are read
        with readline, so pdb gets line editing and history too."""
        try:
            conn = MonitorConnection(self.path, timeout=None)
        except (OSError, ValueError) as e:
            raise ClientError(f"pdb: {e}") from None
        sock = conn.sock
        try:
            sock.sendall(b'{"execute": "pdb"}\n')
            buf = b""
            while b"\n" not in buf:
                data = sock.recv(4096)
                if not data:
                    raise ClientError("the monitor closed the pdb connection")
                buf += data
            line, buf = buf.split(b"\n", 1)
            rep = json.loads(line)
            if "error" in rep:
                print(f"Error: {rep['error']['desc']}", file=sys.stderr)
                return
            self._bridge(sock, buf)
        except OSError as e:
            raise ClientError(f"pdb: {e}") from None
        finally:
            conn.close()

    @staticmethod
    def _bridge(sock: socket.socket, first: bytes) -> None:
        """Show what the debugger writes; when it waits at a prompt, read a line for it."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = decoder.decode(first)
        while True:
            ready: list[Any] = []
            if not pending.endswith("(Pdb) "):
                ready, _, _ = select.select([sock], [], [], PROMPT_IDLE_S if pending else None)
            if ready:
                data = sock.recv(4096)
                if not data:
                    sys.stdout.write(pending)
                    sys.stdout.flush()
                    return
                pending += decoder.decode(data)
                head, sep, pending = pending.rpartition("\n")
                sys.stdout.write(head + sep)
                sys.stdout.flush()
                continue
            if not pending:
                continue
            prompt, pending = pending, ""
            try:
                line = input(prompt)
            except EOFError:
                line = "q"
                print()
            except KeyboardInterrupt:
                line = "c"
                print()
            try:
                sock.sendall((line + "\n").encode())
            except OSError:
                return

    # -- the prompt -----------------------------------------------------------------------------

    def interactive(self) -> int:
        """The prompt. Its history is the monitor's own (``info history``): what was typed
        in earlier sessions of this process's monitor comes back with the up arrow."""
        import readline

        readline.clear_history()
        pid = "?"
        try:
            for line in self.conn.execute("info history"):
                readline.add_history(line)
            self.names = [c["name"] for c in self.conn.execute("help")]
            self.events = [e["name"] for e in self.conn.execute("info trace-events")]
            pid = self.conn.execute("info status")["pid"]
        except (OSError, ValueError, MonitorError):
            pass
        readline.set_completer(self.complete)
        readline.set_completer_delims(" \t")
        readline.parse_and_bind("tab: complete")
        print(f"vreplica {self.role} monitor, run {self.cfg.rid}, pid {pid} "
              "- type 'help' for more information, Ctrl-D to leave")
        while True:
            try:
                line = input(f"({self.role}) ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if not line:
                continue
            if line in ("exit", "quit", "q") and self.role != "qemu":
                return 0
            self.run_one(line, history=True)
            if line in ("quit", "q") and self.role == "qemu":
                return 0

    def complete(self, text: str, state: int) -> str | None:
        import readline

        words = readline.get_line_buffer()[: readline.get_endidx()].split()
        if readline.get_line_buffer()[: readline.get_endidx()].endswith(" "):
            words.append("")
        if len(words) <= 1:
            options = sorted({n.split()[0] for n in self.names} | {"pdb"})
        elif words[0] == "info" and len(words) == 2:
            options = sorted(n.split()[1] for n in self.names if n.startswith("info "))
        elif words[0] == "help" and len(words) == 2:
            options = sorted({n.split()[0] for n in self.names})
        elif words[0] == "trace-event" and len(words) == 2:
            options = self.events
        elif words[0] == "trace-event" and len(words) == 3:
            options = ["on", "off"]
        else:
            options = []
        hits = [o + " " for o in options if o.startswith(text)]
        return hits[state] if state < len(hits) else None


def _quiet_broken_pipe() -> int:
    """stdout's reader left (``| head``): end quietly, as a filter does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def attach_main(argv: list[str]) -> int:
    ap = Parser(prog="vreplica attach", label="vreplica attach",
                description="a monitor prompt in one process of a running replica")
    ap.add_argument("role", choices=(*ROLES, "vhost-user"))
    ap.add_argument("--run", metavar="ID", help="the run (a unique prefix; optional when only "
                                                "one replica runs)")
    ap.add_argument("-c", metavar="CMD", dest="command", help="run one command and exit")
    ap.add_argument("--json", action="store_true", help="print the QMP-style JSON replies")
    a = ap.parse_args(argv)
    try:
        cfg = find_run(a.run)
        s = Session(cfg, a.role, a.json)
        try:
            if a.command is not None:
                return 0 if s.run_one(a.command) else 1
            return s.interactive()
        finally:
            s.conn.close()
    except ClientError as e:
        print(f"vreplica attach: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return _quiet_broken_pipe()
