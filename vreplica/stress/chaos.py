"""The chaos of a stress run: pausing the guest or the host's echo service, killing QEMU,
corrupting the guest's TX ring, at random moments, each logged with when it began."""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vreplica.run.hostside import UdpEcho
from vreplica.run.supervisor import Supervisor

CHAOS_KINDS = {
    "guest-pause": "stop the guest process (SIGSTOP) for 0.2-0.5 s, then continue it",
    "echo-pause": "the host echo service ignores datagrams for 0.3 s (replies lost: expected)",
    "kill-device": "kill -9 the QEMU process; --reconnect brings a new one up (duplicates ok)",
    "ring-fault": "the guest driver corrupts its TX ring; the device errors, the guest resets",
}


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
        before = self.echo.ignored
        start_ns = time.monotonic_ns()
        self.echo.paused = True
        self._stop.wait(0.3)
        self.echo.paused = False
        self.log.add("echo-pause", start_ns, seconds=0.3, end_ns=time.monotonic_ns(),
                     replies_dropped=self.echo.ignored - before)

    def do_kill_device(self) -> None:
        p = self.sup.procs["qemu"]
        p.send_signal(signal.SIGKILL)
        self.log.add("kill-device", pid=p.pid)

    def do_ring_fault(self) -> None:
        p = self.sup.procs["guest"]
        p.send_signal(signal.SIGUSR1)
        self.log.add("ring-fault", pid=p.pid)
