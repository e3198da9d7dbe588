"""Starts the three processes of a run (four with the replica's vhost-user back end),
watches them, stops them in order, removes every IPC object, and gathers what each reported
into the run's summary.

Not part of the replicated system: the hand that sets up the machine and takes it down.
"""

from __future__ import annotations

import _thread
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from common import netns
from common.channel import Channel
from common.ipc import RunConfig, cleanup_dead_runs, create_objects, new_run, remove_run
from common.kvm_abi import unpackb
from common.monitor import pid_path
from vreplica.run.backend_process import BackendFailed, BackendProcess

ROLES = ("kvm", "qemu", "guest")
STOP_GRACE_S = 3.0
SUPERVISOR_GRACE_S = 15.0
"""Beyond --timeout: the guest's own waits give up after --timeout without a reply, then
report; the supervisor gives up this much later."""
RESTART_LIMIT = 10
RESTART_WINDOW_S = 30.0
"""--reconnect restarts QEMU at most RESTART_LIMIT times in any RESTART_WINDOW_S: a QEMU
that dies as soon as it starts ends the run instead of looping."""
ERROR_LINE = re.compile(r"(?P<who>qemu): (?P<dev>virtio-[\w-]+): (?P<msg>.+)")
"""A process's error_report line naming a device (``qemu: virtio-net: Looped descriptor``)."""

CONSOLE_KEPT = 1000
"""The processes' latest console lines the supervisor keeps (a soak's progress lines come
twice a second for hours)."""


def attach_command(rid: str) -> str:
    """How the user who started this run types ``vreplica attach`` (run.sh sets
    VREPLICA_PROG to what it was called as)."""
    return f"{os.environ.get('VREPLICA_PROG', 'vreplica')} attach qemu --run {rid}"


class RunFailed(Exception):
    """The run could not finish: the message is the one line the user sees."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(" / ".join(part.strip() for part in message.splitlines() if part.strip()))
        self.code = code


@dataclass
class RunOptions:
    mode: str = "tx"
    packets: int = 10
    size: int = 64
    dest_port: int = 0
    pace_ms: float = 0.0
    batch: int = 1
    mem: int = 16 << 20
    queue_size: int = 256
    vectors: int | None = None
    ioeventfd: bool = True
    event_idx: bool = True
    mrg_rxbuf: bool = False
    tx: str = "bh"
    tx_burst: int = 256
    arp: bool = True
    trace: str | None = None
    trace_events: str | None = None
    pcap: str | None = None
    timeout: float = 60.0
    udp_expire_s: float = 240.0
    window: int = 1
    guest_port: int = 0
    queues: int = 1
    reconnect: bool = False
    hostfwd: list[tuple[int, int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def msix_vectors(self, nvqs: int = 2) -> int:
        """The MSI-X table size QEMU offers: ``vectors`` (0 = no MSI-X) or, as
        virtio-net-pci's default, one per data queue (``nvqs``), the config interrupt's and
        the control queue's (2 * queues + 2; Linux gives the callback-less control queue
        none, so one entry stays unused).

        ``--vectors 1`` means one vector shared by the queues; that scheme needs two table
        entries (config + shared), so the table gets two.
        """
        if self.vectors is None:
            return nvqs + 2
        return 0 if self.vectors == 0 else max(2, self.vectors)


class Terminated(BaseException):
    """SIGTERM: the run ends, as with Ctrl-C, and says who sent it, as QEMU does (not a
    KeyboardInterrupt: a prompt that takes Ctrl-C as 'cancel the line' must not take it)."""

    def __init__(self, pid: int) -> None:
        super().__init__(terminated_message(pid))


def terminated_message(pid: int) -> str:
    """QEMU's qemu_system_killed line (softmmu/runstate.c): the sender's pid and, as
    qemu_get_pid_name reads it, its /proc/PID/cmdline's first word."""
    if not pid:
        return f"terminating on signal {signal.SIGTERM.value}"
    try:
        name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() or None
    except OSError:
        name = None
    return (f"terminating on signal {signal.SIGTERM.value} from pid {pid} "
            f"({name or '<unknown process>'})")


_term_sender = [0]


def catch_sigterm() -> None:
    """SIGTERM becomes Terminated in the main thread, with the sender's pid: blocked in
    every thread (call this before any starts), taken by a thread of its own with
    sigwaitinfo, and passed to the main thread's handler. The replica's processes unblock
    it (common.process)."""
    def on_sigterm(signum: int, frame: object) -> None:
        raise Terminated(_term_sender[0])

    def waiter() -> None:
        info = signal.sigwaitinfo({signal.SIGTERM})
        _term_sender[0] = info.si_pid
        _thread.interrupt_main(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=waiter, name="sigterm", daemon=True).start()


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold a Ctrl-C (or a SIGTERM) back until the block is done (the run's objects are made
    or removed whole); it is raised at the block's end (KeyboardInterrupt, Terminated)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    for sig in dict.fromkeys(caught):
        handler = old[sig]
        if callable(handler):
            handler(sig, None)  # SIGINT's default handler raises KeyboardInterrupt


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


class Supervisor:
    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.cfg: RunConfig | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.ctl: Channel | None = None
        self.done: set[str] = set()
        self.quit_by_monitor = False
        self.errors: list[str] = []
        self.t_start = 0.0
        self.t_end = 0.0
        self.console: deque[str] = deque(maxlen=CONSOLE_KEPT)
        self.on_console: Callable[[str, str], None] = lambda role, line: None
        self.on_tick: Callable[[], None] = lambda: None
        self.live: dict[str, dict] = {}
        self.restarts = 0
        self.restart_times: deque[float] = deque()
        self.deaths: list[str] = []
        self.last_progress = 0.0
        self.show_error_lines = True
        """False: the processes' device error lines are counted (``error_lines``), not shown."""
        self.error_lines: Counter[str] = Counter()
        self._env: dict[str, str] = {}
        self._announcement: str | None = None
        self.backend: BackendProcess | None = None
        self.backend_restarts: list[int] = []  # when each new back end listened (ns)
        self.before_spawn: Callable[[RunConfig], None] = lambda cfg: None
        """Runs once the run's objects (and network namespace) exist, before its processes:
        host services that live in the namespace start here."""

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> RunConfig:
        """Make the run and start its processes; a Ctrl-C meanwhile comes after, so whatever
        was made is on record for stop() and cleanup()."""
        with deferred_sigint():
            try:
                cfg = self._start()
                self._announcement = self._announcement_for(cfg)
                return cfg
            except OSError as e:
                self.stop()
                raise RunFailed(f"cannot set up the run: {e}") from None
            except BaseException:
                self.stop()
                raise

    def _start(self) -> RunConfig:
        cleanup_dead_runs()
        o = self.opts
        nvqs = 2 * o.queues + 1  # and the control queue
        vectors = o.msix_vectors(2 * o.queues)
        options = {
            "mode": o.mode, "packets": o.packets, "size": o.size, "dest_port": o.dest_port,
            "pace_ms": o.pace_ms, "batch": o.batch, "ioeventfd": o.ioeventfd,
            "event_idx": o.event_idx, "mrg_rxbuf": o.mrg_rxbuf, "tx": o.tx,
            "tx_burst": o.tx_burst, "arp": o.arp, "pcap": o.pcap, "msix_vectors": vectors,
            "udp_expire_s": o.udp_expire_s, "hostfwd": o.hostfwd, "window": o.window,
            "guest_port": o.guest_port, "timeout": o.timeout, "queues": o.queues,
            "reconnect": o.reconnect, **o.extra,
        }
        # vhost over INTx: each queue's guest notifier is an eventfd QEMU reads
        irqfds = max(vectors, nvqs) if o.extra.get("vhost") else max(vectors, 1)
        self.cfg = cfg = new_run(o.mem, o.queue_size, nvqs, irqfds, options)
        create_objects(cfg)
        if o.extra.get("netdev") == "tap" or o.extra.get("vhost_user_host") == "tap":
            # -netdev tap, or a vhost-user back end over a tap: the link lives in a namespace
            cfg.options["netns"] = netns.create(cfg.rid, o.extra.get("tap_backpressure"),
                                                o.queues > 1)
        self.before_spawn(cfg)
        cfg.save()
        self.ctl = Channel(cfg.channel("ctl"))
        env = dict(os.environ)
        env.pop("VREPLICA_TRACE", None)
        env.pop("VREPLICA_TRACE_EVENTS", None)
        if o.trace:
            env["VREPLICA_TRACE"] = "1"
            if o.trace_events:
                env["VREPLICA_TRACE_EVENTS"] = o.trace_events
        self._env = env
        if o.extra.get("netdev") == "vhost-user" and "chardev" not in o.extra:
            self.backend = self._start_backend()
            cfg.options["chardev"] = self.backend.chardev()
            cfg.save()
        self.t_start = time.monotonic()
        for role in ROLES:
            self.procs[role] = self._spawn(role)
        return cfg

    def _start_backend(self) -> BackendProcess:
        """The replica's own vhost-user back end, listening before QEMU connects to it."""
        assert self.cfg is not None
        o = self.opts
        try:
            return BackendProcess(self.cfg, o.extra.get("vhost_user_host", "user"), o.queues,
                                  o.extra.get("vhost_user_poll", False), self._env)
        except BackendFailed as e:
            raise RunFailed(str(e)) from None

    def _announcement_for(self, cfg: RunConfig) -> str | None:
        """--hold / --wait-attach: the line saying which run this is, how to attach to it
        and how to end it (such a run waits for someone); printed on stderr once the
        monitors listen."""
        hold = self.opts.extra.get("hold", False)
        wait_attach = self.opts.extra.get("wait_attach", False)
        if not (hold or wait_attach):
            return None
        attach = attach_command(cfg.rid)
        if wait_attach:
            what = "waits for cont (--wait-attach" + (", --hold)" if hold else ")")
            how = f"attach with '{attach}' and type cont (or run '{attach} -c cont')"
        else:
            what = "stays up after its program (--hold)"
            how = f"attach with '{attach}'"
        return f"vreplica: run {cfg.rid} {what}: {how}; end it with '{attach} -c quit' or Ctrl-C"

    def _announce_when_attachable(self) -> None:
        assert self.cfg is not None
        if self._announcement and all(pid_path(self.cfg.rundir, r).exists() for r in ROLES):
            print(self._announcement, file=sys.stderr, flush=True)
            self._announcement = None

    def _spawn(self, role: str, *flags: str) -> subprocess.Popen:
        """One process of the run, in a process group of its own: a terminal's Ctrl-C goes
        to the supervisor alone, which then stops the run in order."""
        assert self.cfg is not None
        p = subprocess.Popen([sys.executable, "-m", f"{role}proc", *flags, self.cfg.rundir],
                             env=self._env, stdin=subprocess.DEVNULL, process_group=0,
                             stderr=None if self.show_error_lines else subprocess.PIPE)
        if p.stderr is not None:
            threading.Thread(target=self._filter_stderr, args=(p.stderr,),
                             name=f"stderr-{role}", daemon=True).start()
        return p

    def _filter_stderr(self, stream: Any) -> None:
        """A process's stderr, passed on but for its device error lines, which are counted
        per kind (the message with its numbers as N)."""
        for raw in stream:
            line = raw.decode(errors="replace")
            m = ERROR_LINE.fullmatch(line.rstrip("\n"))
            if m:
                kind = f"{m['who']}: {m['dev']}: {re.sub(r'[0-9]+', 'N', m['msg'])}"
                self.error_lines[kind] += 1
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    def restarts_in_window(self) -> int:
        """Restarts within the last RESTART_WINDOW_S (the rate RESTART_LIMIT bounds)."""
        now = time.monotonic()
        return sum(1 for t in self.restart_times if now - t <= RESTART_WINDOW_S)

    def _restart(self, role: str, why: str) -> bool:
        """--reconnect: a new QEMU on the same run (QEMU's -incoming); the guest and KVM go
        on. False: the restart rate's limit is reached."""
        now = time.monotonic()
        while self.restart_times and now - self.restart_times[0] > RESTART_WINDOW_S:
            self.restart_times.popleft()
        if len(self.restart_times) >= RESTART_LIMIT:
            return False
        self.restart_times.append(now)
        self.restarts += 1
        self.deaths.append(why)
        self.last_progress = now
        self.procs[role] = self._spawn(role, "-incoming")
        return True

    def wait(self) -> None:
        """Until the guest program is done and all three have exited; raise if one dies,
        or if the guest reports no progress for --timeout (and a grace)."""
        assert self.ctl is not None
        silence_s = self.opts.timeout + SUPERVISOR_GRACE_S
        self.last_progress = time.monotonic()
        hold = self.opts.extra.get("hold", False)
        attended = hold or self.opts.extra.get("wait_attach", False)
        while True:
            try:
                self._read_ctl(0.1)
            except KeyboardInterrupt:
                if hold:
                    self._read_ctl(0.2)  # the guest's "done" may be queued still
                if not (hold and "guest" in self.done):
                    raise
                self.stop()  # --hold: Ctrl-C ends a finished run, as the monitor's quit does
            self.on_tick()
            self._announce_when_attachable()
            exited = {r: p.poll() for r, p in self.procs.items()}
            for role, rc in exited.items():
                if rc is None or rc == 0:
                    continue
                pid = self.procs[role].pid
                if rc < 0:
                    why = f"{role} process (pid {pid}) died: killed by {_signal_name(rc)}"
                else:
                    err = self.errors[-1] if self.errors else f"exit status {rc}"
                    why = f"{role} process (pid {pid}) failed: {err}"
                if (role == "qemu" and self.opts.reconnect and exited.get("kvm") is None
                        and self._restart(role, why)):
                    exited[role] = None
                    continue
                if len(self.restart_times) >= RESTART_LIMIT:
                    why += (f" ({RESTART_LIMIT} restarts in the last {RESTART_WINDOW_S:g} s: "
                            "--reconnect gives up)")
                elif self.restarts:
                    why += f" (after {self.restarts} restart{'s' if self.restarts > 1 else ''})"
                raise RunFailed(why)
            if self.backend is not None and (rc := self.backend.poll()) is not None:
                how = f"killed by {_signal_name(rc)}" if rc < 0 else f"exit status {rc}"
                why = f"vhost-user backend process (pid {self.backend.pid}) died: {how}"
                now = time.monotonic_ns()
                recent = sum(1 for t in self.backend_restarts
                             if now - t <= RESTART_WINDOW_S * 1e9)
                if not (self.opts.extra.get("restart_backend") and recent < RESTART_LIMIT):
                    raise RunFailed(why)
                self.deaths.append(why)  # a new one on the same socket; QEMU reconnects
                self.backend.stop()
                self.backend = self._start_backend()
                self.backend_restarts.append(time.monotonic_ns())
            if all(rc == 0 for rc in exited.values()):
                self._read_ctl(0)
                if "guest" not in self.done:
                    if self.quit_by_monitor:  # QEMU's quit: it exits 0, and so does the run
                        raise RunFailed("ended by the monitor's quit before the guest's "
                                        "program finished: no summary", 0)
                    raise RunFailed("the guest stopped before its program finished")
                self.t_end = time.monotonic()
                return
            if time.monotonic() - self.last_progress > silence_s and not attended:
                running = ", ".join(r for r, c in exited.items() if c is None)
                raise RunFailed(f"timed out: no progress from the guest for {silence_s:g} s "
                                f"(--timeout {self.opts.timeout:g} + {SUPERVISOR_GRACE_S:g}; "
                                f"still running: {running})")

    def _read_ctl(self, timeout: float) -> None:
        """Take every pending control record (waiting up to ``timeout`` for the first)."""
        assert self.ctl is not None
        rec = self.ctl.recv_raw(timeout)
        while rec is not None:
            kind, role, fields = unpackb(rec)
            if role == "guest" and kind in ("console", "done"):
                self.last_progress = time.monotonic()
            if kind == "done":
                self.done.add(role)
            elif kind == "quit":
                self.quit_by_monitor = True
            elif kind == "console":
                self.console.append(f"{role}: {fields.get('line')}")
                self.on_console(role, fields.get("line", ""))
            elif kind == "stats":
                self.live[role] = fields
            elif kind == "error":
                self.errors.append(f"{role}: {fields.get('message')}")
            rec = self.ctl.recv_raw(0)

    def run(self, on_started: Callable[[], None] | None = None,
            before_stop: Callable[[], None] | None = None) -> RunConfig:
        """start, then wait; Ctrl-C ends the run as "interrupted" (exit 130); whatever
        happens the processes are stopped (``before_stop`` first)."""
        try:
            cfg = self.start()
            if on_started is not None:
                on_started()
            self.wait()
            return cfg
        except Terminated as e:
            raise RunFailed(str(e), 128 + signal.SIGTERM.value) from None
        except KeyboardInterrupt:
            raise RunFailed("interrupted", 130) from None
        finally:
            if before_stop is not None:
                before_stop()
            self.stop()

    def stop(self) -> None:
        """Stop whatever still runs (guest first, as a VM is paused before it is torn down)."""
        with deferred_sigint():
            for role in ("guest", "qemu", "kvm"):
                p = self.procs.get(role)
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            for p in self.procs.values():
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if self.backend is not None:  # after QEMU: it takes the rings back first
                self.backend.stop()

    def cleanup(self) -> None:
        with deferred_sigint():
            if self.ctl is not None:
                self.ctl.close()
            if self.cfg is not None:
                remove_run(self.cfg)

    # -- results ------------------------------------------------------------------------------

    def reports(self) -> dict[str, Any]:
        assert self.cfg is not None
        out = {}
        for role in ROLES:
            path = Path(self.cfg.rundir) / f"report.{role}.json"
            if path.exists():
                out[role] = json.loads(path.read_text())
        if self.backend is not None and (backend := self.backend.report()) is not None:
            out["vhost-user"] = backend
        return out

    def rss(self) -> dict[str, int]:
        """Resident set size of each live process, in bytes."""
        out = {}
        for role, p in self.procs.items():
            try:
                out[role] = psutil.Process(p.pid).memory_info().rss
            except psutil.Error:
                pass
        return out

    def trace_pieces(self) -> list[Path]:
        assert self.cfg is not None
        return sorted(Path(self.cfg.rundir).glob("trace.*.msgpack"))
