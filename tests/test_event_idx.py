"""VIRTIO_RING_F_EVENT_IDX against the ring flags, in one burst: counts, not timings.

The burst is made deterministic by holding each side still while the other works, with
SIGSTOP, as a host that does not schedule a process would:

* QEMU stopped, the guest sends K datagrams. With the flags, QEMU left notifications on
  (VRING_USED_F_NO_NOTIFY clear) and each ``virtqueue_kick_prepare`` kicks; with EVENT_IDX
  ``avail_event`` stays where QEMU left it and only the first datagram crosses it.
* The guest stopped, QEMU sends the K completions, notifying after each (as
  ``virtio_net_flush_tx`` does). With the flags the guest left interrupts on; with
  EVENT_IDX ``used_event`` (``virtqueue_enable_cb_delayed``: 3/4 of what was pending) is
  crossed once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from common.ipc import SHM_DIR, RunConfig
from common.monitor import pid_path, query
from common.vring import VRING_USED_F_NO_NOTIFY

if TYPE_CHECKING:
    from conftest import UdpCollector

pytestmark = pytest.mark.usefixtures("no_leftovers")

REPO = Path(__file__).resolve().parent.parent
BURST = 128
"""Datagrams in the burst: half the TX ring, so the ring never fills."""
TX = "TX(q1)"


@pytest.fixture
def runs_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="vre-", dir="/tmp"))
    yield root
    left = list(root.iterdir())
    if not left:
        root.rmdir()
    assert not left, f"left in the runs root: {left}"


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return got


class HeldRun:
    """``vreplica run --hold``: the guest program ends and the processes stay up."""

    def __init__(self, root: Path, port: int, *args: str) -> None:
        env = dict(os.environ, VREPLICA_RUNS=str(root))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vreplica.cli", "run", "--hold", "--packets", "1",
             "--dest-port", str(port), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # the --hold announcement: the monitors listen
        assert line.startswith("vreplica: run "), line + self.proc.stderr.read()
        self.rundir = root / line.split()[2]
        self.pids = {role: int(pid_path(self.rundir, role).read_text())
                     for role in ("guest", "qemu")}

    def q(self, role: str, cmd: str) -> Any:
        return query(self.rundir, role, cmd)

    def tx_queue(self) -> dict[str, Any]:
        return self.q("qemu", "info stats")["queues"][TX]

    def guest_txq(self) -> dict[str, Any]:
        return next(v for v in self.q("guest", "info virtqueues") if v["name"] == "output.0")

    def kicks_wanted(self) -> bool:
        """QEMU has TX notifications on, as the guest reads them in the ring: with EVENT_IDX
        ``avail_event`` is the avail index (the next buffer kicks), else the used ring's
        flags lack VRING_USED_F_NO_NOTIFY. Read from the guest RAM segment itself."""
        g = self.guest_txq()
        with open(SHM_DIR / RunConfig.load(self.rundir).ram.lstrip("/"), "rb") as ram:
            ram.seek(g["used"])
            flags = int.from_bytes(ram.read(2), "little")
            ram.seek(g["used"] + 4 + 8 * g["num"])
            avail_event = int.from_bytes(ram.read(2), "little")
        if g["event_idx"]:
            return avail_event == g["avail_idx"]
        return not flags & VRING_USED_F_NO_NOTIFY

    def signal(self, role: str, sig: signal.Signals) -> None:
        os.kill(self.pids[role], sig)

    def quit(self) -> str:
        assert self.q("qemu", "quit") == {}
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return out

    def close(self) -> None:
        for pid in self.pids.values():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


def burst(root: Path, port: int, event_idx: str) -> dict[str, int]:
    """The kicks the guest made for a burst QEMU was stopped through, and the interrupts
    QEMU raised for its completions while the guest was stopped."""
    r = HeldRun(root, port, "--event-idx", event_idx)
    try:
        wait_for(lambda: r.q("guest", "info status")["program"] == "done", "the program")
        start = wait_for(lambda: (lambda g: g["used_idx"] == g["avail_idx"] and g)(
            r.guest_txq()), "the first datagram to be used")["avail_idx"]
        wait_for(r.kicks_wanted, "QEMU to turn TX notifications back on")
        kicks0, notifies0 = r.guest_txq()["kicks"], r.tx_queue()["notifies"]

        r.signal("qemu", signal.SIGSTOP)
        assert "queued" in r.q("guest", f"send {BURST}")
        wait_for(lambda: (lambda s: s["sent_by_monitor"] == BURST and s["pending_sends"] == 0)(
            r.q("guest", "info status")), "the guest to send the burst")
        g = r.guest_txq()
        assert g["avail_idx"] == (start + BURST) & 0xFFFF and g["used_idx"] == start
        kicks = g["kicks"] - kicks0

        r.signal("guest", signal.SIGSTOP)
        r.signal("qemu", signal.SIGCONT)
        tx = wait_for(lambda: (lambda t: t["used_idx"] == (start + BURST) & 0xFFFF and t)(
            r.tx_queue()), "QEMU to use the burst")
        interrupts = tx["notifies"] - notifies0
        r.signal("guest", signal.SIGCONT)

        wait_for(lambda: r.guest_txq()["last_used_idx"] == (start + BURST) & 0xFFFF,
                 "the guest to reclaim the burst")
        assert r.quit().startswith("run ")
        return {"kicks": kicks, "interrupts": interrupts}
    finally:
        r.close()


@pytest.mark.timeout(180)
def test_event_idx_cuts_kicks_and_interrupts_per_packet_tenfold(
        runs_root: Path, udp_collector: UdpCollector) -> None:
    """The same burst with EVENT_IDX on and off: with it on, kicks and interrupts per
    packet are at least ten times fewer, and the burst still arrives whole."""
    on = burst(runs_root, udp_collector.port, "on")
    off = burst(runs_root, udp_collector.port, "off")
    assert on["kicks"] >= 1 and on["interrupts"] >= 1, on
    assert off["kicks"] >= 10 * on["kicks"], (on, off)
    assert off["interrupts"] >= 10 * on["interrupts"], (on, off)
    assert off["kicks"] <= BURST and off["interrupts"] <= BURST, off
    got = udp_collector.wait_for(2 * (1 + BURST))
    assert len(got) == 2 * (1 + BURST)
