"""The transmit path end to end: the three real processes started by the CLI send datagrams
from the guest, through KVM and QEMU's slirp, to a UDP socket the test opened on 127.0.0.1.

Runs either go through a real ``python -m vreplica.cli run`` process, or through
``vreplica.cli.main`` in this process with ``build_summary`` watched, so that the per-process
reports the summary is folded from (guest, kvm, qemu) can be checked too. Every test also
passes ``no_leftovers``: no process, IPC object or run directory outlives a run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import vreplica.cli as cli
from common.virtio_abi import VIRTIO_RING_F_EVENT_IDX
from vreplica.run import launch
from vreplica.run.hostside import expected_payload
from vreplica.run.summary import build_summary, kicks_line

if TYPE_CHECKING:
    from conftest import UdpCollector

pytestmark = pytest.mark.usefixtures("no_leftovers")

REPO = Path(__file__).resolve().parent.parent

RUN_TIMEOUT_S = 60


@dataclass
class Run:
    summary: dict[str, Any]
    reports: dict[str, Any]


def run_cli_process(args: list[str], tmp_path: Path) -> dict[str, Any]:
    """``python -m vreplica.cli run ARGS``; its --summary-json, after checking it succeeded."""
    out = tmp_path / f"summary-{time.monotonic_ns()}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vreplica.cli", "run", *args, "--timeout", str(RUN_TIMEOUT_S),
         "--summary-json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def run_cli_inline(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """``vreplica.cli.main(['run', *ARGS])`` here, keeping the reports the summary is built from."""
    reports: dict[str, Any] = {}

    def keep_reports(rid: str, opts: Any, reps: dict[str, Any], sink: dict | None,
                     elapsed_s: float) -> dict[str, Any]:
        reports.update(reps)
        return build_summary(rid, opts, reps, sink, elapsed_s)

    monkeypatch.setattr(launch, "build_summary", keep_reports)
    out = tmp_path / f"summary-{time.monotonic_ns()}.json"
    rc = cli.main(["run", *args, "--timeout", str(RUN_TIMEOUT_S), "--summary-json", str(out)])
    assert rc == 0
    assert set(reports) == {"guest", "kvm", "qemu"}
    return Run(json.loads(out.read_text()), reports)


def assert_received_exactly(collector: UdpCollector, n: int, size: int) -> None:
    """The socket got datagrams 0..n-1, each with its exact payload, in order, once each.
    (That no more came is slirp's count of what it sent: ``assert_clean_delivery``.)"""
    got = collector.wait_for(n, timeout=5.0)
    assert len(got) == n, f"received {len(got)} datagrams, expected {n}"
    bad = [i for i, data in enumerate(got) if data != expected_payload(i, size)]
    assert not bad, (f"{len(bad)} datagrams differ, first at position {bad[0]}: "
                     f"{got[bad[0]][:16].hex()}... (len {len(got[bad[0]])})")
    assert {host for host, _ in collector.peers} == {"127.0.0.1"}


def assert_clean_delivery(summary: dict[str, Any], n: int) -> None:
    assert summary["sent"] == n
    assert summary["delivered"] == n
    assert summary["delivered_counted_by"] == "slirp sendto"
    assert summary["device_errors"] == []


def event_idx_negotiated(run: Run) -> bool:
    guest = bool(run.reports["guest"]["features"] & (1 << VIRTIO_RING_F_EVENT_IDX))
    device = bool(run.reports["qemu"]["guest_features"] & (1 << VIRTIO_RING_F_EVENT_IDX))
    assert guest == device
    return guest


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ioeventfd", ["on", "off"])
def test_datagrams_reach_a_socket_of_the_test(ioeventfd: str, tmp_path: Path,
                                              udp_collector: UdpCollector) -> None:
    """Every datagram the guest sends reaches the test's own socket with the exact payload
    (8-byte big-endian sequence number + filler), in order, once, with or without ioeventfd;
    the kicks went the way the option says (through the ioeventfd or not)."""
    n, size = 200, 300
    s = run_cli_process(["--packets", str(n), "--size", str(size), "--ioeventfd", ioeventfd,
                         "--dest-port", str(udp_collector.port)], tmp_path)
    assert_received_exactly(udp_collector, n, size)
    assert_clean_delivery(s, n)
    assert s["ioeventfd"] is (ioeventfd == "on")
    assert s["kicks"] >= 1
    if ioeventfd == "on":
        assert s["exits"]["ioeventfd_signals"] >= 1
    else:
        assert s["exits"]["ioeventfd_signals"] == 0


@pytest.mark.timeout(120)
def test_event_idx_burst_takes_fewer_kicks_than_packets(
        tmp_path: Path, udp_collector: UdpCollector, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under EVENT_IDX a back-to-back burst of 500 datagrams needs fewer kicks than packets:
    while QEMU is busy with the queue the driver is not asked to notify it."""
    n, size = 500, 64
    run = run_cli_inline(["--packets", str(n), "--size", str(size), "--event-idx", "on",
                          "--ioeventfd", "on", "--dest-port", str(udp_collector.port)],
                         tmp_path, monkeypatch)
    assert_received_exactly(udp_collector, n, size)
    assert_clean_delivery(run.summary, n)
    assert event_idx_negotiated(run)
    kicks = run.summary["kicks"]
    assert 1 <= kicks < n
    assert run.summary["kicks_per_packet"] < 1
    assert run.reports["guest"]["sq"][0]["kicks"] == kicks


@pytest.mark.timeout(120)
def test_busy_poll_takes_buffers_that_would_have_needed_a_kick(
        tmp_path: Path, udp_collector: UdpCollector, monkeypatch: pytest.MonkeyPatch) -> None:
    """Datagrams a millisecond apart: without polling QEMU drains the ring and
    turns kicks back on before each next one, so each is kicked; with --poll-us 5000 the bottom
    half finds most of them while it polls, with kicks still off (vhost-net's poll-us)."""
    n, size = 150, 64
    kicks = {}
    for poll in ("0", "5000"):
        run = run_cli_inline(["--packets", str(n), "--size", str(size), "--pace-ms", "1",
                              "--poll-us", poll, "--dest-port", str(udp_collector.port)],
                             tmp_path, monkeypatch)
        assert_clean_delivery(run.summary, n)
        vnet = run.reports["qemu"]["virtio_net"]
        kicks[poll] = run.summary["kicks"]
        if poll == "0":
            assert vnet["tx_polls"] == 0
        else:
            assert vnet["tx_poll_hits"] > 0 and vnet["tx_polls"] >= vnet["tx_poll_hits"]
    udp_collector.wait_for(2 * n, timeout=5.0)
    got = list(udp_collector.datagrams)
    assert got == [expected_payload(i % n, size) for i in range(2 * n)]
    assert kicks["0"] > n // 2
    assert kicks["5000"] < kicks["0"] // 2, kicks


@pytest.mark.timeout(200)
def test_kicks_without_ioeventfd_are_io_exits_handled_by_qemu(
        tmp_path: Path, udp_collector: UdpCollector, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --ioeventfd off every kick is a KVM_EXIT_IO that KVM hands to QEMU's vCPU thread:
    no ioeventfd fires, QEMU handles exactly as many kicks as the driver made, the KVM_EXIT_IO
    exits KVM reports are the ones QEMU's kvm_cpu_exec saw, and from a short run to a long
    paced one (a kick per datagram) the KVM_EXIT_IO count grows by exactly the extra kicks."""
    runs = []
    for n, pace in ((5, "0"), (60, "1")):
        udp_collector.datagrams.clear()
        run = run_cli_inline(["--packets", str(n), "--size", "64", "--ioeventfd", "off",
                              "--pace-ms", pace, "--dest-port", str(udp_collector.port)],
                             tmp_path, monkeypatch)
        assert_received_exactly(udp_collector, n, 64)
        s, guest, qemu = run.summary, run.reports["guest"], run.reports["qemu"]
        assert_clean_delivery(s, n)
        assert s["exits"]["ioeventfd_signals"] == 0
        assert all(e["signals"] == 0 for e in run.reports["kvm"]["ioeventfds"])
        tx_kicks = guest["sq"][0]["kicks"]
        rx_kicks = guest["rq"][0]["kicks"]
        assert s["kicks"] == tx_kicks >= 1
        assert s["kicks_handled"] == qemu["queues"]["TX(q1)"]["kicks_handled"] == tx_kicks
        assert qemu["queues"]["RX(q0)"]["kicks_handled"] == rx_kicks
        io_exits = s["userspace_exits"]["KVM_EXIT_IO"]
        assert qemu["kvm_run_exits"]["KVM_EXIT_IO"] == io_exits
        assert s["exits"]["io_exits"] >= io_exits
        runs.append((io_exits, tx_kicks + rx_kicks))
    (io_short, kicks_short), (io_long, kicks_long) = runs
    assert kicks_long > kicks_short
    assert io_long - io_short == kicks_long - kicks_short


@pytest.mark.timeout(120)
def test_without_event_idx_everything_is_delivered(
        tmp_path: Path, udp_collector: UdpCollector, monkeypatch: pytest.MonkeyPatch) -> None:
    """--event-idx off: the feature is not negotiated (notification suppression falls back to
    the ring flags) and every datagram still arrives intact and in order."""
    n, size = 300, 128
    run = run_cli_inline(["--packets", str(n), "--size", str(size), "--event-idx", "off",
                          "--dest-port", str(udp_collector.port)], tmp_path, monkeypatch)
    assert_received_exactly(udp_collector, n, size)
    assert_clean_delivery(run.summary, n)
    assert run.summary["event_idx"] is False
    assert not event_idx_negotiated(run)
    assert 1 <= run.summary["kicks"] <= n + 1  # n datagrams and the ARP request before them


@pytest.mark.timeout(120)
def test_kicks_handled_add_up(tmp_path: Path, udp_collector: UdpCollector,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Kicks QEMU handled = the driver's + QEMU's own one when it starts the ioeventfd - those
    one eventfd read took together (measured by the read's count), short only of signals
    still unread when the run ended; the summary line says so."""
    n = 3000
    run = run_cli_inline(["--packets", str(n), "--size", "64", "--dest-port",
                          str(udp_collector.port)], tmp_path, monkeypatch)
    assert_received_exactly(udp_collector, n, 64)
    s = run.summary
    own = s["ioeventfd_starts"] * s["queue_pairs_max"]
    assert own == 1  # one queue pair, one DRIVER_OK
    assert s["kicks_coalesced"] >= 0
    unread = s["kicks"] + own - s["kicks_coalesced"] - s["kicks_handled"]
    assert 0 <= unread <= 1
    line = kicks_line(s)
    assert f"+{own} its own at start, -{s['kicks_coalesced']} merged in eventfd" in line
