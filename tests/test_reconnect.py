"""``vreplica run --reconnect``: QEMU killed (kill -9) under load, again and again; a new QEMU
takes the same guest over (qemuproc/cpr.py) and every datagram reaches the test's socket,
duplicates only of the chains in flight at a kill, and counted."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_process_faults import HostSocket, children_of, finish, start_run

pytestmark = pytest.mark.usefixtures("no_leftovers")

QUEUE_SIZE = 256


@pytest.fixture
def host() -> Iterator[HostSocket]:
    h = HostSocket()
    yield h
    h.close()


def qemu_of(p: subprocess.Popen, not_pid: int = 0, timeout: float = 10.0) -> psutil.Process:
    """The run's QEMU, once one other than ``not_pid`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in psutil.Process(p.pid).children():
            try:
                if "qemuproc" in c.cmdline() and c.pid != not_pid:
                    return c
            except psutil.Error:
                continue
        time.sleep(0.01)
    raise AssertionError("no new QEMU was started")


def kill_qemu_repeatedly(p: subprocess.Popen, host: HostSocket, n: int, kills: int) -> list[int]:
    """Kill QEMU ``kills`` times, each once the run is sending (more datagrams arrived since
    the last restart); returns the killed pids."""
    children_of(p)
    killed: list[int] = []
    for k in range(kills):
        q = qemu_of(p, killed[-1] if killed else 0)
        goal = len(host.seqs) + n // (2 * kills + 2)
        assert host.wait_for(goal, 20.0) >= goal, f"no traffic before kill {k + 1}"
        q.send_signal(signal.SIGKILL)
        killed.append(q.pid)
    return killed


def check_delivery(host: HostSocket, n: int, summary: dict) -> None:
    host.wait_for(n, 5.0)
    seqs = host.seqs
    missing = set(range(n)) - set(seqs)
    assert not missing, f"{len(missing)} sequence numbers lost, e.g. {sorted(missing)[:5]}"
    dups = len(seqs) - len(set(seqs))
    assert max(seqs) == n - 1
    assert dups <= summary["resubmitted"] <= QUEUE_SIZE, (dups, summary["resubmitted"])
    assert summary["guest_resets"] == 0 and summary["device_errors"] == []
    recovered = [q for i in summary["incomings"] for q in i.get("queues", [])]
    assert not [q for q in recovered if q["mismatch"]], "inflight record and rings disagree"
    print(f"delivered {n}, duplicates {dups}, resubmitted {summary['resubmitted']}, "
          f"restarts {summary['device_restarts']}")


def run_with_kills(tmp_path: Path, host: HostSocket, n: int, kills: int,
                   *args: str) -> dict:
    out = tmp_path / "summary.json"
    p = start_run("--reconnect", "--summary-json", str(out), *args, port=host.port, packets=n)
    try:
        killed = kill_qemu_repeatedly(p, host, n, kills)
    except BaseException:
        p.send_signal(signal.SIGINT)
        finish(p)
        raise
    rc, _, err = finish(p)
    assert rc == 0, err
    summary = json.loads(out.read_text())
    assert summary["device_restarts"] == kills
    assert [f"qemu process (pid {pid}) died: killed by SIGKILL" for pid in killed] \
        == summary["device_deaths"]
    return summary


@pytest.mark.timeout(60)
def test_three_qemu_kills_under_load_lose_nothing(tmp_path: Path, host: HostSocket) -> None:
    n = 60_000
    summary = run_with_kills(tmp_path, host, n, 3)
    check_delivery(host, n, summary)
    assert summary["sent"] == n
    assert len(summary["incomings"]) == 3


@pytest.mark.timeout(60)
def test_kills_while_exits_go_to_qemu(tmp_path: Path, host: HostSocket) -> None:
    """No ioeventfd and INTx: every kick and every interrupt acknowledgement is an exit to
    QEMU, so kills land while QEMU handles one (the new QEMU gets it again from kvm_run)."""
    n = 20_000
    summary = run_with_kills(tmp_path, host, n, 2, "--ioeventfd", "off", "--vectors", "0")
    check_delivery(host, n, summary)
    assert summary["interrupt_mode"] == "intx"
    replayed = [i["replayed_exit"] for i in summary["incomings"] if i.get("replayed_exit")]
    assert replayed and set(replayed) <= {"KVM_EXIT_IO", "KVM_EXIT_MMIO"}, summary["incomings"]


@pytest.mark.timeout(60)
def test_kills_on_packed_rings(tmp_path: Path, host: HostSocket) -> None:
    """The packed ring has no used index in guest RAM: the new QEMU takes its positions and
    wrap counters from the inflight record (qemuproc/vhost_user_inflight.py, packed), and
    every datagram still arrives, duplicates only of the chains in flight."""
    n = 30_000
    summary = run_with_kills(tmp_path, host, n, 2, "--transport", "modern", "--ring", "packed")
    check_delivery(host, n, summary)
    assert summary["ring"] == "packed" and summary["sent"] == n
    recovered = [q for i in summary["incomings"] for q in i.get("queues", [])]
    assert all(q["used_idx"] < QUEUE_SIZE for q in recovered)  # a ring position, not an index
