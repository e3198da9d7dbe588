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

from vreplica.run import supervisor
from vreplica.run.summary import kicks_line
from vreplica.run.supervisor import RunOptions, Supervisor
from vreplica.stress.chaos import Chaos, ChaosLog

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
    # the driver's kicks and the last QEMU's count differ, and the line says why
    assert f"handled by the last QEMU: {summary['kicks_handled']} (QEMU restarted {kills} " \
        "time(s); each new one counts from its start)" in kicks_line(summary)
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


# -- the restart rate -------------------------------------------------------------------------


class FakeQemu:
    """A QEMU process the test 'kills': the supervisor restarts it at once."""

    def __init__(self, sup: Supervisor, refused: list[float], clock: list[float]) -> None:
        self.sup, self.refused, self.clock = sup, refused, clock
        self.pid = 1

    def send_signal(self, sig: int) -> None:
        assert sig == signal.SIGKILL
        if not self.sup._restart("qemu", "killed"):
            self.refused.append(self.clock[0])


def fake_supervisor(monkeypatch: pytest.MonkeyPatch) -> tuple[Supervisor, list[float], list[float]]:
    """A Supervisor whose clock the test moves and whose restarts start nothing."""
    clock = [1000.0]
    refused: list[float] = []
    sup = Supervisor(RunOptions(reconnect=True))
    monkeypatch.setattr(supervisor.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(sup, "_spawn", lambda role, *flags: FakeQemu(sup, refused, clock))
    sup.procs["qemu"] = FakeQemu(sup, refused, clock)  # type: ignore[assignment]
    return sup, refused, clock


@pytest.mark.timeout(10)
def test_restarts_are_limited_by_rate_not_by_count(monkeypatch: pytest.MonkeyPatch) -> None:
    sup, refused, clock = fake_supervisor(monkeypatch)
    for _ in range(100):  # one every 4 s for 400 s: a long soak's kills
        assert sup._restart("qemu", "killed")
        clock[0] += 4.0
    clock[0] += 60.0
    burst = [sup._restart("qemu", "died at once") for _ in range(11)]  # a crash loop
    assert burst == [True] * 10 + [False]
    clock[0] += 31.0
    assert sup._restart("qemu", "killed")
    assert sup.restarts == 111


@pytest.mark.timeout(10)
def test_stress_kills_never_reach_the_restart_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """kill-device as often as the chaos thread could ask (every 0.1 s for a minute): every
    kill is restarted, and there are kills all along."""
    sup, refused, clock = fake_supervisor(monkeypatch)
    chaos = Chaos(["kill-device"], sup, None, ChaosLog(clock[0]), seed=1, period_s=0.1)
    kill_times = []
    for _ in range(600):
        before = sup.restarts
        chaos.do_kill_device()
        if sup.restarts > before:
            kill_times.append(clock[0])
        clock[0] += 0.1
    assert refused == []
    assert len(kill_times) >= 10
    assert max(b - a for a, b in zip(kill_times, kill_times[1:], strict=False)) < 31
