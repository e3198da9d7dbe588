"""``vreplica run --netdev vhost-user``: four processes, the replica's QEMU as front-end and
its vhost-user back end (vhostuserproc) serving the rings, slirp behind it to 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


def vreplica(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vreplica.cli", "run", "--netdev", "vhost-user",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def summary_of(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "summary.json"
    proc = vreplica("--summary-json", str(out), "--timeout", "100", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("args", [
    ["--packets", "20000"],
    ["--packets", "5000", "--transport", "modern", "--ring", "packed", "--mrg-rxbuf", "on"],
    ["--packets", "5000", "--queues", "2", "--transport", "modern"],
    ["--packets", "3000", "--vectors", "0"],
], ids=["split", "packed", "two-pairs", "intx"])
def test_every_datagram_through_four_processes(tmp_path: Path, no_leftovers: Any,
                                               args: list[str]) -> None:
    s = summary_of(tmp_path, *args)
    n = int(args[1])
    assert s["sent"] == n and s["delivered"] == n
    vu = s["vhost_user"]
    backend = vu["backend"]
    assert backend is not None and backend["panics"] == []
    # the back end moved what the guest's driver sent and received, pair by pair
    assert [q["tx_frames"] for q in backend["queues"]] == vu["guest_tx_frames"]
    assert [q["rx_frames"] for q in backend["queues"]] == vu["guest_rx_frames"]
    assert vu["qemu"]["chardev"]["connects"] == 1 and vu["qemu"]["link_downs"] == 0


def test_echo_both_ways(tmp_path: Path, no_leftovers: Any) -> None:
    s = summary_of(tmp_path, "--mode", "echo", "--packets", "300", "--window", "8")
    assert s["replies"] == 300 and s["bad_replies"] == 0
    backend = s["vhost_user"]["backend"]
    assert backend["queues"][0]["rx_frames"] == s["vhost_user"]["guest_rx_frames"][0] >= 300


def _backend_of(sup: psutil.Process, deadline_s: float = 30.0) -> psutil.Process:
    """The run's back end once QEMU is connected to it (the guest is sending)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        kids = sup.children()
        backend = [p for p in kids if "vhostuserproc" in " ".join(p.cmdline())]
        if backend and any("guestproc" in " ".join(p.cmdline()) for p in kids):
            return backend[0]
        time.sleep(0.05)
    raise AssertionError("no back end process")


def test_backend_killed_mid_run_is_one_line(no_leftovers: Any) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "vreplica.cli", "run", "--netdev",
                             "vhost-user", "--packets", "100000", "--pace-ms", "1",
                             "--timeout", "100"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        backend = _backend_of(psutil.Process(proc.pid))
        backend.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert lines[-1] == (f"vreplica: vhost-user backend process (pid {backend.pid}) died: "
                         "killed by SIGKILL"), err


def test_supervisor_killed_takes_the_backend(no_leftovers: Any) -> None:
    """kill -9 of the supervisor: the back end dies with it (PDEATHSIG), the other three
    remove the run; no_leftovers checks processes, shm, mqueues and the socket's run dir."""
    proc = subprocess.Popen([sys.executable, "-m", "vreplica.cli", "run", "--netdev",
                             "vhost-user", "--packets", "100000", "--pace-ms", "1",
                             "--timeout", "100"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    backend = _backend_of(psutil.Process(proc.pid))
    children = psutil.Process(proc.pid).children()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    backend.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=60)  # each removes the run as it goes
    assert alive == []


def test_more_queues_than_the_backend_gives_is_refused() -> None:
    proc = vreplica("--queues", "5", timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "gives 1 to 4 queue pairs" in lines[0], proc.stderr
