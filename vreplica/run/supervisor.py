"""Starts the three processes of a run, watches them, stops them in order, removes every IPC
object, and gathers what each reported into the run's summary.

Not part of the replicated system: the hand that sets up the machine and takes it down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
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

ROLES = ("kvm", "qemu", "guest")
STOP_GRACE_S = 3.0
SUPERVISOR_GRACE_S = 15.0
MAX_RESTARTS = 16


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


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold a Ctrl-C back until the block is done (the run's objects are made or removed
    whole); it is raised, as KeyboardInterrupt, at the block's end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if caught and callable(old):
        old(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


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
        self.console: list[str] = []
        self.on_console: Callable[[str, str], None] = lambda role, line: None
        self.on_tick: Callable[[], None] = lambda: None
        self.live: dict[str, dict] = {}
        self.restarts = 0
        self.deaths: list[str] = []
        self._env: dict[str, str] = {}
        self._announcement: str | None = None
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
        if o.extra.get("netdev") == "tap":  # -netdev tap: the link lives in a namespace
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
        self.t_start = time.monotonic()
        for role in ROLES:
            self.procs[role] = self._spawn(role)
        return cfg

    def _announcement_for(self, cfg: RunConfig) -> str | None:
        """--hold / --wait-attach: the line saying which run this is, how to attach to it
        and how to end it (such a run waits for someone); printed on stderr once the
        monitors listen."""
        hold = self.opts.extra.get("hold", False)
        wait_attach = self.opts.extra.get("wait_attach", False)
        if not (hold or wait_attach):
            return None
        attach = f"vreplica attach qemu --run {cfg.rid}"
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
        return subprocess.Popen([sys.executable, "-m", f"{role}proc", *flags, self.cfg.rundir],
                                env=self._env, stdin=subprocess.DEVNULL, process_group=0)

    def _restart(self, role: str, why: str) -> None:
        """--reconnect: a new QEMU on the same run (QEMU's -incoming); the guest and KVM go on."""
        self.restarts += 1
        self.deaths.append(why)
        self.procs[role] = self._spawn(role, "-incoming")

    def wait(self) -> None:
        """Until the guest program is done and all three have exited; raise if one dies."""
        assert self.ctl is not None
        deadline = time.monotonic() + self.opts.timeout + SUPERVISOR_GRACE_S
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
                if (role == "qemu" and self.opts.reconnect and self.restarts < MAX_RESTARTS
                        and exited.get("kvm") is None):
                    self._restart(role, why)
                    exited[role] = None
                    continue
                if self.restarts:
                    why += f" (after {self.restarts} restart{'s' if self.restarts > 1 else ''})"
                raise RunFailed(why)
            if all(rc == 0 for rc in exited.values()):
                self._read_ctl(0)
                if "guest" not in self.done:
                    if self.quit_by_monitor:  # QEMU's quit: it exits 0, and so does the run
                        raise RunFailed("ended by the monitor's quit before the guest's "
                                        "program finished: no summary", 0)
                    raise RunFailed("the guest stopped before its program finished")
                self.t_end = time.monotonic()
                return
            if time.monotonic() > deadline and not attended:
                running = ", ".join(r for r, c in exited.items() if c is None)
                raise RunFailed(f"timed out after {self.opts.timeout:g} s (still running: "
                                f"{running})")

    def _read_ctl(self, timeout: float) -> None:
        """Take every pending control record (waiting up to ``timeout`` for the first)."""
        assert self.ctl is not None
        rec = self.ctl.recv_raw(timeout)
        while rec is not None:
            kind, role, fields = unpackb(rec)
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
