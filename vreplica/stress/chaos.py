"""The chaos of a stress run: pausing the guest or the host's echo service, killing QEMU,
corrupting the guest's TX ring, at random moments, each logged with when it began."""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from vreplica.run.hostside import UdpEcho
from vreplica.run.supervisor import RESTART_LIMIT, RESTART_WINDOW_S, Supervisor

CHAOS_KINDS = {
    "guest-pause": "stop the guest process (SIGSTOP) for 0.2-0.5 s, then continue it",
    "echo-pause": "the host echo service stops reading its socket for 0.3 s, as a stopped "
                  "process would (the socket's buffer holds what comes: nothing is lost)",
    "kill-device": "kill -9 the QEMU process; --reconnect brings a new one up (duplicates ok)",
    "ring-fault": "the guest driver corrupts its TX ring; the device errors, the guest resets",
    "kill-backend": "kill -9 the vhost-user back end (--netdev vhost-user); a new one listens "
                    "and QEMU (reconnect=1) takes the link up again",
}
BACKEND_KINDS = ("kill-backend",)
"""Kinds only a run with the replica's own vhost-user back end has."""


def backend_connected(pid: int, path: str) -> bool:
    """The back end has accepted a connection on ``path`` (QEMU is back)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="unix")
    except psutil.Error:
        return False
    return sum(1 for c in conns if c.laddr == path) >= 2


@dataclass
class ChaosLog:
    t0: float
    events: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, start_ns: int = 0, **details: Any) -> dict[str, Any]:
        """One event; ``start_ns`` (monotonic) when it began, if not now."""
        start_ns = start_ns or time.monotonic_ns()
        event = {"t_s": round(start_ns / 1e9 - self.t0, 3), "kind": kind, "start_ns": start_ns,
                 **details}
        self.events.append(event)
        return event


class Chaos:
    """Fires the chosen kinds of trouble at random moments while the run goes on."""

    def __init__(self, kinds: list[str], sup: Supervisor, echo: UdpEcho | None, log: ChaosLog,
                 seed: int, period_s: float) -> None:
        self.kinds = kinds
        self.sup = sup
        self.echo = echo
        self.log = log
        self.rng = random.Random(seed)
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> None:
        if self.kinds:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def _run(self) -> None:
        deck: list[str] = []  # each kind once a round, in a random order: all of them fire
        while not self._stop.wait(self.period_s * (0.5 + self.rng.random())):
            if not deck:
                deck = self.rng.sample(self.kinds, len(self.kinds))
            kind = deck.pop()
            try:
                getattr(self, "do_" + kind.replace("-", "_"))()
            except (OSError, KeyError) as e:
                self.log.add(kind, error=str(e))

    def do_guest_pause(self) -> None:
        p = self.sup.procs["guest"]
        pause = 0.2 + 0.3 * self.rng.random()
        p.send_signal(signal.SIGSTOP)
        event = self.log.add("guest-pause", seconds=round(pause, 3))
        self._stop.wait(pause)
        p.send_signal(signal.SIGCONT)
        event["end_ns"] = time.monotonic_ns()

    def do_echo_pause(self) -> None:
        if self.echo is None:
            return
        start_ns = time.monotonic_ns()
        self.echo.pause()
        self._stop.wait(0.3)
        self.echo.resume()
        self.log.add("echo-pause", start_ns, seconds=0.3, end_ns=time.monotonic_ns())

    def do_kill_device(self) -> None:
        if self.sup.restarts_in_window() >= RESTART_LIMIT // 2:
            return  # at most half the supervisor's restart rate: stress never reaches it
        p = self.sup.procs["qemu"]
        p.send_signal(signal.SIGKILL)
        self.log.add("kill-device", pid=p.pid)

    def do_kill_backend(self) -> None:
        """The back end dies; the outage ends when QEMU is connected to the new one."""
        backend = self.sup.backend
        if backend is None:
            return
        now = time.monotonic_ns()
        if sum(1 for t in self.sup.backend_restarts
               if now - t <= RESTART_WINDOW_S * 1e9) >= RESTART_LIMIT // 2:
            return  # at most half the supervisor's restart rate, as for kill-device
        restarts = len(self.sup.backend_restarts)
        backend.proc.send_signal(signal.SIGKILL)
        event = self.log.add("kill-backend", pid=backend.pid)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and not self._stop.is_set():
            new = self.sup.backend
            if len(self.sup.backend_restarts) > restarts and new is not None \
                    and backend_connected(new.pid, str(new.socket)):
                event["end_ns"] = time.monotonic_ns()
                return
            self._stop.wait(0.01)

    def do_ring_fault(self) -> None:
        p = self.sup.procs["guest"]
        p.send_signal(signal.SIGUSR1)
        self.log.add("ring-fault", pid=p.pid)
