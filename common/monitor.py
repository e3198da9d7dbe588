"""The monitor each replica process serves: QEMU's HMP and QMP, reduced to one small server.

Each process listens on ``<rundir>/monitor.<role>.sock`` (mode 0600 in the 0700 run
directory; never a network port) and answers from threads of its own, so a command gets its
reply while the process's loop is blocked on IPC. A connection opens with a QMP-like greeting
line; then every request is one line:

* ``{"execute": "info status", "format": "json"|"human", "id": ...}`` gets one JSON line back,
  ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` (QMP's shapes);
* a plain command line (``info status``) gets HMP text back, ending in the prompt ``(role) ``.

``pdb`` turns the connection into a debugger session on that process's loop thread.

The loops are held through ``Gate``s: a safe point in one thread's loop where the thread runs
``if gate.armed: gate.wait()``, a single attribute test while no one asked for anything.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from common import trace

SIG_IPI = "SIG_IPI"
"""The VM-channel record that stands for QEMU's SIG_IPI to its vCPU thread in KVM_RUN
(pause_all_vcpus): KVM makes the guest exit and KVM_RUN return KVM_EXIT_INTR."""
PARK_TICK_S = 0.25
STOP_SETTLE_S = 0.5
STEP_TIMEOUT_S = 2.0
PDB_PICKUP_S = 1.0
PDB_SKIP = ["threading", "common.monitor", "bdb", "pdb"]
VERSION = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "virtio-net-replica"}


def socket_path(rundir: str | Path, role: str) -> Path:
    return Path(rundir) / f"monitor.{role}.sock"


def pid_path(rundir: str | Path, role: str) -> Path:
    return Path(rundir) / f"pid.{role}"


class MonitorError(Exception):
    """A command failed; ``cls`` is QMP's error class."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


@dataclass
class Reply:
    """A command's result: ``data`` for JSON clients, ``text`` for the HMP prompt."""

    data: Any
    text: str


@dataclass
class Command:
    name: str
    handler: Callable[[list[str]], Any]
    args: str = ""
    help: str = ""


def parse_int(text: str, what: str = "number") -> int:
    """An integer as HMP takes it: decimal, 0x hex, and + / - between terms."""
    expr = text.replace("-", "+-")
    try:
        return sum(int(term, 0) for term in expr.split("+") if term)
    except ValueError:
        raise MonitorError(f"invalid {what}: {text!r}", "InvalidParameter") from None


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


WRAPPER_FILES = frozenset([threading.__file__, __file__] + [
    str(Path(__file__).with_name(name)) for name in ("channel.py", "notifier.py")])


def thread_frame(ident: int | None) -> FrameType | None:
    """A thread's innermost frame outside the waiting wrappers (locks, channels, gates)."""
    frame = sys._current_frames().get(ident or -1)
    innermost = frame
    while frame is not None and frame.f_code.co_filename in WRAPPER_FILES:
        frame = frame.f_back
    return frame or innermost


def thread_where(ident: int | None) -> str:
    """Where a thread is now, as ``function (file:line)``."""
    frame = thread_frame(ident)
    if frame is None:
        return "not running"
    return f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"


# -- gates --------------------------------------------------------------------------------------


class Gate:
    """A safe point in one thread's loop where the monitor can hold that thread (stop), let
    it through once (step), or hand it work to do there (a pdb session).

    ``on_park`` / ``on_unpark`` run in the thread around a hold (e.g. drop and retake the Big
    QEMU Lock); ``on_arm`` hears when ``armed`` changes; ``nudge`` makes a thread that is
    blocked in its loop come round; ``idle_check`` runs every tick while parked and may raise
    to end the hold (e.g. the VM was destroyed).
    """

    def __init__(self, name: str, thread_name: str = "MainThread") -> None:
        self.name = name
        self.thread_name = thread_name
        self.armed = False
        self.parked = False
        self.parks = 0
        self.passes = 0
        self.ident: int | None = None
        self.on_park: Callable[[], None] | None = None
        self.on_unpark: Callable[[], None] | None = None
        self.on_arm: Callable[[bool], None] | None = None
        self.nudge: Callable[[], None] | None = None
        self.idle_check: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._budget = 0
        self._work: list[Callable[[FrameType], bool]] = []

    def _update(self) -> None:
        armed = self._stop or bool(self._work)
        if armed != self.armed:
            self.armed = armed
            if self.on_arm is not None:
                self.on_arm(armed)

    @property
    def stopped(self) -> bool:
        return self._stop

    def thread_ident(self) -> int | None:
        if self.ident is not None:
            return self.ident
        for t in threading.enumerate():
            if t.name == self.thread_name:
                return t.ident
        return None

    def where(self) -> str:
        return "parked" if self.parked else thread_where(self.thread_ident())

    # -- the thread's side ----------------------------------------------------------------------

    def wait(self) -> None:
        """Called by the gate's thread when ``armed``: hold, step, or run work."""
        caller = sys._getframe(1)
        released = False
        try:
            with self._cond:
                self.ident = threading.get_ident()
                while True:
                    if self._work:
                        fn = self._work.pop(0)
                        self._update()
                        self._cond.release()
                        try:
                            through = fn(caller)
                        finally:
                            self._cond.acquire()
                        if through:
                            break
                        continue
                    if not self._stop:
                        break
                    if self._budget:
                        self._budget -= 1
                        break
                    if not self.parked:
                        self.parked = True
                        self.parks += 1
                        self._cond.notify_all()
                        if self.on_park is not None and not released:
                            self.on_park()
                            released = True
                    self._cond.wait(PARK_TICK_S)
                    if self.idle_check is not None and self.parked and not self._work:
                        self.idle_check()
        finally:
            with self._cond:
                self.parked = False
                self.passes += 1
                self._cond.notify_all()
            if released and self.on_unpark is not None:
                self.on_unpark()

    # -- the monitor's side ---------------------------------------------------------------------

    def request_stop(self, nudge: bool = True) -> None:
        with self._cond:
            self._stop = True
            self._budget = 0
            self._update()
        if nudge and self.nudge is not None:
            self.nudge()

    def release(self) -> None:
        with self._cond:
            self._stop = False
            self._budget = 0
            self._update()
            self._cond.notify_all()

    def wait_parked(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.parked:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def step(self, timeout: float) -> bool:
        """Let the parked thread run one iteration; True once it is parked again. An
        iteration still waiting halfway through ``timeout`` is nudged to finish."""
        with self._cond:
            if not self.parked:
                raise MonitorError(f"{self.name} is not at its stop point")
            parks = self.parks
            self._budget = 1
            self._cond.notify_all()
            start = time.monotonic()
            nudged = self.nudge is None
            while self.parks == parks:
                waited = time.monotonic() - start
                if waited >= timeout:
                    return False
                if not nudged and waited >= timeout / 2:
                    nudged = True
                    self._cond.release()
                    try:
                        self.nudge()  # type: ignore[misc]
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait(timeout / 2 - waited if not nudged else timeout - waited)
            return True

    def post(self, fn: Callable[[FrameType], bool]) -> None:
        """Have the thread run ``fn(frame of its loop)`` at the gate; True lets it through."""
        with self._cond:
            self._work.append(fn)
            self._update()
            self._cond.notify_all()
        if self.nudge is not None:
            self.nudge()

    def withdraw(self, fn: Callable[[FrameType], bool]) -> bool:
        """Take back work the thread has not started; False if it already has."""
        with self._cond:
            if fn in self._work:
                self._work.remove(fn)
                self._update()
                return True
            return False

    def describe(self) -> dict[str, Any]:
        return {"state": "parked" if self.parked else ("stopping" if self._stop else "running"),
                "where": self.where(), "passes": self.passes}


# -- pdb over the socket ------------------------------------------------------------------------


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


# -- the server ---------------------------------------------------------------------------------


class Monitor:
    """One process's monitor: its command registry, its gates, and the socket server."""

    def __init__(self, role: str, rundir: str | Path) -> None:
        self.role = role
        self.rundir = Path(rundir)
        self.path = socket_path(rundir, role)
        self.prompt = f"({role}) "
        self.commands: dict[str, Command] = {}
        self.aliases = {"c": "cont"}
        self.gates: list[Gate] = []
        self.step_gate: Gate | None = None
        self.stats: Callable[[], dict] = dict
        self.status_info: Callable[[], dict] = dict
        self.stepping = threading.Lock()
        self.debugging = False
        self.prelaunch = False
        self._sock: socket.socket | None = None
        self._after_reply = threading.local()
        self._register_common()

    # -- registry -------------------------------------------------------------------------------

    def command(self, name: str, args: str = "", help: str = "") -> Callable:
        """Decorator: register ``fn(args) -> data | Reply`` as command ``name``."""

        def register(fn: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
            self.commands[name] = Command(name, fn, args, help)
            return fn

        return register

    def after_reply(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the current command's reply is on its way (e.g. quit)."""
        self._after_reply.fn = fn

    def lookup(self, line: str) -> tuple[Command, list[str]]:
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise MonitorError(str(e), "InvalidParameter") from None
        if not words:
            raise MonitorError("empty command", "CommandNotFound")
        head = self.aliases.get(words[0], words[0])
        if head == "info":
            if len(words) < 2:
                return self.commands["help"], ["info"]
            name, args = f"info {words[1]}", words[2:]
        else:
            name, args = head, words[1:]
        cmd = self.commands.get(name)
        if cmd is None:
            raise MonitorError(f"unknown command: '{name}'", "CommandNotFound")
        return cmd, args

    def execute(self, line: str) -> Reply:
        cmd, args = self.lookup(line)
        out = cmd.handler(args)
        if isinstance(out, Reply):
            return out
        if out is None:
            return Reply({}, "")
        return Reply(out, out if isinstance(out, str) else format_human(out))

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
        for g in self.gates:
            g.request_stop()
        deadline = time.monotonic() + STOP_SETTLE_S
        for g in self.gates:
            g.wait_parked(max(0.0, deadline - time.monotonic()))
        return {g.name: g.describe() for g in self.gates}

    def vm_start(self) -> None:
        self.prelaunch = False
        for g in self.gates:
            g.release()

    def _step(self, count: int) -> Reply:
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
        lines = [f"{gate.name}: {done} iteration{'s' if done != 1 else ''}, "
                 f"{len(events)} trace event{'s' if len(events) != 1 else ''}"]
        for e in events:
            args = " ".join(f"{k}={v}" for k, v in (e["args"] or {}).items())
            lines.append(f"  +{e['ts_us']:9.1f} us  {e['name']} {args}".rstrip())
        if not finished:
            data["where"] = gate.where()
            lines.append(f"  (the iteration has not finished: {data['where']})")
        return Reply(data, "\n".join(lines))

    # -- pdb ------------------------------------------------------------------------------------

    def _pdb(self, stream: Any) -> None:
        """A pdb session on the step gate's thread, over ``stream``; returns when it ends.

        The thread takes the session at its gate and pdb stops at the next line of its loop.
        A thread that does not come round (blocked on IPC) is held where it is instead, and
        pdb shows its stack from the monitor's thread.
        """
        gate = self.step_gate
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

        self.debugging = True
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
            self.debugging = False

    # -- common commands ------------------------------------------------------------------------

    def _register_common(self) -> None:
        cmd = self.command

        @cmd("help", "[command]", "show the commands, or one command's help")
        def _help(args: list[str]) -> Reply:
            prefix = " ".join(args)
            rows = [c for name, c in sorted(self.commands.items())
                    if not prefix or name == prefix or name.startswith(prefix + " ")]
            data = [{"name": c.name, "args": c.args, "help": c.help} for c in rows]
            text = "\n".join(f"{c.name}{' ' + c.args if c.args else ''} -- {c.help}" for c in rows)
            return Reply(data, text)

        @cmd("info status", "", "show the VM's run state")
        def _info_status(args: list[str]) -> Reply:
            state = self.run_state()
            data = {"status": state, "running": state == "running", "singlestep": False,
                    "role": self.role, "pid": os.getpid(),
                    "threads": {g.name: g.describe() for g in self.gates},
                    **self.status_info()}
            lines = [f"VM status: {'running' if state == 'running' else 'paused'}"
                     + (f" ({state})" if state not in ("running", "paused") else "")]
            for name, t in data["threads"].items():
                lines.append(f"{name}: {t['state']}"
                             + (f", in {t['where']}" if t["state"] != "parked" else ""))
            for k, v in data.items():
                if k in ("status", "running", "singlestep", "role", "pid", "threads"):
                    continue
                if isinstance(v, dict):
                    v = ", ".join(f"{kk}={vv}" for kk, vv in v.items())
                lines.append(f"{k}: {v}")
            return Reply(data, "\n".join(lines))

        @cmd("stop", "", "stop the process's loops at their next safe point")
        def _stop(args: list[str]) -> Reply:
            threads = self.vm_stop()
            busy = [f"{name}: stops when {t['where']} returns" for name, t in threads.items()
                    if t["state"] != "parked"]
            return Reply({"status": self.run_state(), "threads": threads}, "\n".join(busy))

        @cmd("cont", "", "resume the process's loops")
        def _cont(args: list[str]) -> Reply:
            self.vm_start()
            return Reply({"status": self.run_state()}, "")

        @cmd("step", "[N]", "while stopped: run N (1) iterations of the loop and show "
                             "the trace events they produced")
        def _step(args: list[str]) -> Reply:
            n = parse_int(args[0], "count") if args else 1
            if not 1 <= n <= 1000:
                raise MonitorError("step: N must be 1..1000", "InvalidParameter")
            return self._step(n)

        @cmd("trace-event", "name on|off", "switch trace events (glob patterns allowed)")
        def _trace_event(args: list[str]) -> Reply:
            if len(args) != 2 or args[1] not in ("on", "off"):
                raise MonitorError("usage: trace-event NAME|PATTERN on|off", "InvalidParameter")
            names = trace.set_state(args[0], args[1] == "on")
            if not names and args[0] not in ("*", "spans"):
                raise MonitorError(f"unknown trace event: {args[0]}")
            return Reply({"events": names, "state": args[1]}, "")

        @cmd("info trace-events", "[pattern]", "show the trace events and their state")
        def _info_trace_events(args: list[str]) -> Reply:
            pattern = args[0] if args else "*"
            rows = {name: ev.on for name, ev in sorted(trace.EVENTS.items())
                    if fnmatch.fnmatchcase(name, pattern)}
            text = "\n".join(f"{name} : state {int(on)}" for name, on in rows.items())
            return Reply([{"name": n, "state": "enabled" if on else "disabled"}
                          for n, on in rows.items()], text)

        @cmd("info stats", "", "show the process's counters")
        def _info_stats(args: list[str]) -> Any:
            return {"process": process_stats(), **self.stats()}

        @cmd("pdb", "", "debug the process's loop thread with pdb on this terminal")
        def _pdb(args: list[str]) -> Reply:
            raise MonitorError("pdb needs the interactive monitor (vreplica attach)")

    # -- socket server --------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on the run directory's socket and note this process's pid beside it."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(8)
        self._sock = sock
        pid_file = pid_path(self.rundir, self.role)
        tmp = pid_file.with_name(f".{pid_file.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.rename(pid_file)
        threading.Thread(target=self._accept_loop, name=f"monitor:{self.role}",
                         daemon=True).start()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        for p in (self.path, pid_path(self.rundir, self.role)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def _accept_loop(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            uid = int.from_bytes(creds[4:8], sys.byteorder)
            if uid not in (os.getuid(), 0):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="monitor-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        stream = conn.makefile("rw", encoding="utf-8", errors="replace", newline="\n")
        try:
            greeting = {"QMP": {"version": VERSION, "capabilities": [], "role": self.role,
                                "pid": os.getpid()}}
            stream.write(json.dumps(greeting) + "\n")
            stream.flush()
            while True:
                line = stream.readline()
                if not line:
                    return
                line = line.strip()
                if line.startswith("{"):
                    if self._serve_json(stream, line):
                        return
                elif line:
                    if self._serve_text(stream, line):
                        return
                else:
                    stream.write(self.prompt)
                    stream.flush()
        except (OSError, ValueError):
            pass
        finally:
            try:
                stream.close()
                conn.close()
            except OSError:
                pass

    def _is_pdb(self, line: str) -> bool:
        return line.split(None, 1)[0] == "pdb" if line.strip() else False

    def _serve_json(self, stream: Any, line: str) -> bool:
        """One QMP-like request; True when the connection is over (pdb)."""
        try:
            req = json.loads(line)
            cmdline = req["execute"]
            if not isinstance(cmdline, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._send(stream, {"error": {"class": "GenericError",
                                          "desc": "expected {\"execute\": \"COMMAND LINE\"}"}})
            return False
        human = req.get("format") == "human"
        if self._is_pdb(cmdline):
            self._send(stream, {"return": {"pdb": self.role}, **_id(req)})
            self._run_pdb(stream)
            return True
        self._after_reply.fn = None
        try:
            r = self.execute(cmdline)
            out = {"return": r.text if human else r.data, **_id(req)}
        except MonitorError as e:
            out = {"error": {"class": e.cls, "desc": e.desc}, **_id(req)}
        except Exception as e:  # noqa: BLE001 - a monitor bug must not kill the process
            out = {"error": {"class": "GenericError", "desc": f"{type(e).__name__}: {e}"},
                   **_id(req)}
        self._send(stream, out)
        self._run_after_reply()
        return False

    def _serve_text(self, stream: Any, line: str) -> bool:
        if self._is_pdb(line):
            self._run_pdb(stream)
            return True
        self._after_reply.fn = None
        try:
            text = self.execute(line).text
        except MonitorError as e:
            text = f"Error: {e.desc}"
        except Exception as e:  # noqa: BLE001
            text = f"Error: {type(e).__name__}: {e}"
        stream.write(text + ("\n" if text and not text.endswith("\n") else "") + self.prompt)
        stream.flush()
        self._run_after_reply()
        return False

    def _run_pdb(self, stream: Any) -> None:
        try:
            self._pdb(stream)
        except MonitorError as e:
            stream.write(f"Error: {e.desc}\n")
        stream.flush()

    def _run_after_reply(self) -> None:
        fn = getattr(self._after_reply, "fn", None)
        self._after_reply.fn = None
        if fn is not None:
            fn()

    @staticmethod
    def _send(stream: Any, obj: dict) -> None:
        stream.write(json.dumps(obj, default=str) + "\n")
        stream.flush()


def _id(req: dict) -> dict:
    return {"id": req["id"]} if "id" in req else {}


def process_stats() -> dict[str, Any]:
    """This process as the kernel sees it (psutil)."""
    import psutil

    p = psutil.Process()
    with p.oneshot():
        cpu = p.cpu_times()
        ctx = p.num_ctx_switches()
        return {"pid": p.pid, "threads": p.num_threads(),
                "cpu_user_s": round(cpu.user, 3), "cpu_system_s": round(cpu.system, 3),
                "rss_bytes": p.memory_info().rss,
                "ctx_switches": {"voluntary": ctx.voluntary, "involuntary": ctx.involuntary}}


# -- guest memory dumps (HMP x / xp) ------------------------------------------------------------

SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}


def parse_fmt(fmt: str) -> tuple[int, str, int]:
    """``/[count][format][size]``: count, format (x d u o c), size in bytes; default 1 x w."""
    body = fmt[1:]
    digits = ""
    while body and body[0].isdigit():
        digits, body = digits + body[0], body[1:]
    count = int(digits) if digits else 1
    form, size = "x", 4
    for ch in body:
        if ch in SIZES:
            size = SIZES[ch]
        elif ch in "xduoc":
            form = ch
        elif ch == "i":
            raise MonitorError("format 'i' (instructions): the replica's guest has no machine "
                               "code to disassemble", "InvalidParameter")
        else:
            raise MonitorError(f"invalid char in format: '{ch}'", "InvalidParameter")
    if form == "c":
        size = 1
    if not 1 <= count <= 4096:
        raise MonitorError("count must be 1..4096", "InvalidParameter")
    return count, form, size


def memory_dump(read: Callable[[int, int], bytes], args: list[str], cmd: str) -> Reply:
    """HMP's memory_dump: ``cmd /FMT ADDR`` through ``read(addr, len)``."""
    if args and args[0].startswith("/"):
        count, form, size = parse_fmt(args[0])
        args = args[1:]
    else:
        count, form, size = 1, "x", 4
    if len(args) != 1:
        raise MonitorError(f"usage: {cmd} /fmt addr", "InvalidParameter")
    addr = parse_int(args[0], "address")
    try:
        data = read(addr, count * size)
    except Exception as e:  # noqa: BLE001 - the accessor's refusal is the user's answer
        raise MonitorError(f"Cannot access memory at 0x{addr:x}: {e}") from None
    values = [int.from_bytes(data[i : i + size], "little", signed=form == "d")
              for i in range(0, len(data), size)]
    line_size = 8 if size == 1 else 16
    digits = {"x": size * 2, "o": (size * 8 + 2) // 3, "u": (size * 80 + 32) // 33,
              "d": (size * 80 + 32) // 33}.get(form, 0)
    lines = []
    per_line = line_size // size
    for i in range(0, len(values), per_line):
        cells = []
        for v in values[i : i + per_line]:
            if form == "x":
                cells.append(f"0x{v:0{digits}x}")
            elif form == "o":
                cells.append(f"{'0' + format(v, 'o') if v else '0':>{digits}}")
            elif form == "c":
                cells.append(_printc(v))
            else:
                cells.append(f"{v:>{digits}}")
        lines.append(f"{addr + i * size:016x}: " + " ".join(cells))
    return Reply({"addr": addr, "format": form, "size": size, "values": values,
                  "bytes": data.hex()}, "\n".join(lines))


def _printc(c: int) -> str:
    special = {ord("'"): "\\'", ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r"}
    if c in special:
        return f"'{special[c]}'"
    return f"'{chr(c)}'" if 32 <= c <= 126 else f"'\\x{c:02x}'"


# -- the client side ----------------------------------------------------------------------------


class MonitorConnection:
    """A JSON connection to one process's monitor."""

    def __init__(self, path: str | Path, timeout: float | None = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.stream = self.sock.makefile("rw", encoding="utf-8", errors="replace",
                                         newline="\n")
        line = self.stream.readline()
        if not line:
            raise ConnectionError(f"{path}: the monitor closed the connection")
        self.greeting = json.loads(line)["QMP"]

    def request(self, cmdline: str, human: bool = False) -> dict:
        """The raw reply: ``{"return": ...}`` or ``{"error": {...}}``."""
        req = {"execute": cmdline}
        if human:
            req["format"] = "human"
        self.stream.write(json.dumps(req) + "\n")
        self.stream.flush()
        line = self.stream.readline()
        if not line:
            raise ConnectionError("the monitor closed the connection")
        return json.loads(line)

    def execute(self, cmdline: str, human: bool = False) -> Any:
        """The reply's ``return``; a QMP error raises MonitorError."""
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
    """Run one command in ``role``'s monitor; returns its JSON ``return``."""
    with MonitorConnection(socket_path(rundir, role), timeout) as c:
        return c.execute(cmdline)
