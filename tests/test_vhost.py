"""``--netdev tap --vhost on``: vhost-net in the KVM process serves the rings in guest RAM;
QEMU only sets it up (vhost_net_start) and takes the rings back (vhost_net_stop).

Runs go through a real ``python -m vreplica.cli run``; one test drives the Supervisor
itself so that it can kill QEMU and look into KVM before the run is taken down.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from replica import run_summary

from common.monitor import query
from common.netns import privilege_problem
from common.virtio_abi import VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
from vreplica.run.supervisor import RunFailed, RunOptions, Supervisor

pytestmark = [pytest.mark.usefixtures("no_leftovers"),
              pytest.mark.skipif(privilege_problem() is not None,
                                 reason=f"--netdev tap: {privilege_problem()}")]

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60


def run(tmp_path: Path, *args: str) -> dict:
    return run_summary(tmp_path, "--netdev", "tap", "--vhost", "on", *args, "--timeout",
                       str(TIMEOUT_S), timeout=TIMEOUT_S + 30)


def kernel_vq(s: dict, index: int) -> dict:
    (dev,) = s["vhost"]["kernel"]
    return dev["vqs"][index]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("size", [64, 1472])
def test_vhost_guest_to_host_exactly(tmp_path: Path, size: int) -> None:
    """Every datagram reaches the socket once and in order; every TX chain (the guest's
    ARP request too) went through the vhost worker's handle_tx, none through QEMU."""
    n = 2000
    s = run(tmp_path, "--packets", str(n), "--size", str(size))
    assert s["host"] == {"received": n, "unique": n, "bad_payloads": 0, "duplicates": 0,
                         "in_order": True}
    tx = kernel_vq(s, 1)
    assert tx["packets"] == n + 1 and tx["errors"] == 0
    assert s["kicks_handled"] == 0  # QEMU's virtio_queue_notify never ran for TX
    assert s["tap"]["stats"]["written"] == 0  # nor did QEMU write the tap


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("size", "mrg"), [(64, "off"), (1472, "off")])
def test_vhost_host_to_guest_exactly(tmp_path: Path, size: int, mrg: str) -> None:
    """The tap's frames go into the guest's buffers straight from the worker's handle_rx
    (with mergeable buffers a 1514-byte frame spans three 512-byte ones)."""
    n = 500
    s = run(tmp_path, "--mode", "sink", "--packets", str(n), "--size", str(size),
            "--mrg-rxbuf", mrg)
    assert (s["arrived"], s["unique"], s["duplicates"], s["in_order"]) == (n, n, 0, True)
    rx = kernel_vq(s, 0)
    assert rx["packets"] >= n and rx["errors"] == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("size", "mrg"), [(64, "off"), (1472, "on")])
def test_vhost_echo_round_trips_and_rings_go_back_to_qemu(tmp_path: Path, size: int,
                                                          mrg: str) -> None:
    """Round trips through both of the worker's handlers (with mergeable buffers a 1514-byte
    reply spans three 512-byte ones, num_buffers written by handle_rx); at the end
    vhost_net_stop takes the rings back (VHOST_GET_VRING_BASE) and QEMU's queues stand
    where vhost left them."""
    n = 300
    s = run(tmp_path, "--mode", "echo", "--packets", str(n), "--window", "8", "--size",
            str(size), "--mrg-rxbuf", mrg)
    assert (s["replies"], s["bad_replies"], s["duplicate_replies"]) == (n, 0, 0)
    if mrg == "on":
        assert kernel_vq(s, 0)["last_used_idx"] >= 3 * n
    q = s["vhost"]["qemu"]
    assert (q["starts"], q["stops"], q["started"]) == (1, 1, False)
    rx, tx = kernel_vq(s, 0), kernel_vq(s, 1)
    assert q["ring_bases"] == {"0": rx["last_avail_idx"], "1": tx["last_avail_idx"]}
    assert tx["last_avail_idx"] == tx["last_used_idx"] >= n


@pytest.mark.timeout(60)
def test_vhost_qemu_tx_bottom_half_never_runs(tmp_path: Path) -> None:
    """While vhost owns the queues QEMU's TX bottom half is never scheduled: its main loop
    polls neither the ioeventfds nor the tap."""
    run_dir_reports: dict = {}

    opts = RunOptions(mode="tx", packets=1000, dest_port=9,
                      extra={"netdev": "tap", "vhost": True, "csum": True})
    sup = Supervisor(opts)
    try:
        sup.run()
        run_dir_reports = sup.reports()
    finally:
        sup.cleanup()
    q = run_dir_reports["qemu"]
    assert q["bh_runs"].get("virtio_net_tx_bh0") == 0
    assert all(v["kicks_handled"] == 0 and v["pops"] == 0 for name, v in q["queues"].items()
               if name.startswith("TX"))
    assert q["vhost"]["ring_bases"]["1"] == 1001


@pytest.mark.timeout(60)
def test_vhost_stops_when_qemu_dies() -> None:
    """Two queue pairs: ``info vhost`` shows a device with its worker process per pair (a
    child of the KVM process named ``vhost-<QEMU pid>``) and ``info network`` each NIC queue
    with its tap queue. kill -9 of QEMU closes its /dev/vhost-net files: the kernel releases
    both devices, their workers end and the tap queues are dropped, as in the real kernel;
    KVM goes on until it is stopped."""
    opts = RunOptions(mode="tx", packets=10_000_000, timeout=60, dest_port=9, queues=2,
                      extra={"netdev": "tap", "vhost": True, "csum": True})
    sup = Supervisor(opts)
    try:
        cfg = sup.start()
        deadline = time.monotonic() + 20
        tx_packets = 0
        while time.monotonic() < deadline and tx_packets < 1000:
            try:
                d = query(cfg.rundir, "kvm", "info vhost")
                tx_packets = d["open"][0]["vqs"][1]["packets"] if d["open"] else 0
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.05)
        assert tx_packets >= 1000, "vhost moved no traffic"
        assert len(d["open"]) == 2
        net = query(cfg.rundir, "qemu", "info network")
        assert [(c["name"], c["index"]) for c in net["clients"]] == [
            ("virtio-net-pci.0", 0), ("n0", 0), ("virtio-net-pci.1", 1), ("n0", 1)]
        assert len(net["tap"]["queues"]) == 2
        assert [p["vq_index"] for p in net["tap"]["vhost"]["pairs"]] == [0, 2]
        qemu = psutil.Process(sup.procs["qemu"].pid)
        worker = f"vhost-{qemu.pid}"
        kvm = psutil.Process(sup.procs["kvm"].pid)
        workers = [c for c in kvm.children() if c.name() == worker]
        assert len(workers) == 2
        assert sorted(dev["worker_pid"] for dev in d["open"]) == sorted(w.pid for w in workers)
        assert all(w.cmdline()[0] == worker for w in workers)
        qemu.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        d = {}
        while time.monotonic() < deadline:
            d = query(cfg.rundir, "kvm", "info vhost")
            if not d["open"] and len(d["released"]) == 2:
                break
            time.sleep(0.02)
        assert d["open"] == [] and len(d["released"]) == 2
        assert all([v["backend"] for v in r["vqs"]] == [None, None] for r in d["released"])
        assert not [c for c in kvm.children() if c.name() == worker]  # ended by the release
    finally:
        sup.stop()
        sup.cleanup()


@pytest.mark.timeout(90)
def test_demo_follows_one_packet_through_vhost(tmp_path: Path) -> None:
    """``demo --netdev tap --vhost on``: the chain vp_notify -> KVM's ioeventfd -> the vhost
    worker's handle_tx -> the tap -> the host's echo socket, the completion back through the
    irqfd, and the reply through handle_rx to the guest's socket, in that order."""
    proc = subprocess.run([sys.executable, "-m", "vreplica.cli", "demo", "--netdev", "tap",
                           "--vhost", "on", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # causal order only: what the worker does after its write races the host socket
    for chain in (["udp_sendmsg", "vp_notify", "ioeventfd_write", "vhost_poll_wakeup",
                   "handle_tx", "vhost_get_vq_desc", "tun_sendmsg",
                   "host: the echo socket at 10.0.2.2 has it", "handle_rx", "tun_recvmsg",
                   "udp_rcv", "recvfrom"],
                  ["tun_sendmsg", "vhost_signal  vq 1", "irqfd_wakeup", "kvm_inj_virq",
                   "vring_interrupt  irq", "skb_xmit_done"]):
        at = 0
        for step in chain:
            found = out.find(f" {step}", at)
            assert found >= 0, f"{step} missing after position {at}:\n{out}"
            at = found
    assert "irqfd_wakeup" in out and "kvm_inj_virq" in out
    assert "virtio_net_tx_bh" not in out and "virtqueue_pop" not in out  # QEMU stayed out


@pytest.mark.timeout(90)
def test_qemu_command_line_netdev_tap_vhost(tmp_path: Path) -> None:
    """QEMU's spelling, ``-netdev tap,id=n0,vhost=on -device virtio-net-pci,netdev=n0``,
    runs the same path; a bad tap property gets QEMU's wording and exit status 2."""
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, "-m", "vreplica.cli", "run", "-netdev",
                           "tap,id=n0,vhost=on,script=no,downscript=no", "-device",
                           "virtio-net-pci,netdev=n0", "--packets", "300", "--summary-json",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(out.read_text())
    assert s["host"]["received"] == 300 and kernel_vq(s, 1)["packets"] == 301
    bad = subprocess.run([sys.executable, "-m", "vreplica.cli", "run", "-netdev",
                          "tap,id=n0,vhost=maybe", "-device", "virtio-net-pci,netdev=n0"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert bad.stderr == ("vreplica: -netdev tap,id=n0,vhost=maybe: Parameter 'vhost' expects "
                          "'on' or 'off'\n")


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("fault", "kernel_message"), [
    ("loop", "Loop detected: last one at"),
    ("next", "Desc index is"),
])
def test_vhost_guest_fault_ends_in_the_vq_error_and_a_clean_run(tmp_path: Path, fault: str,
                                                                kernel_message: str) -> None:
    """A broken TX chain is found by vhost's own checks (vhost_get_vq_desc's vq_err): the
    worker stops serving the queue and signals its error eventfd; QEMU reports the vring
    error, the guest resets the device (vhost_net_stop, then vhost_net_start at DRIVER_OK)
    and every other datagram arrives once."""
    n = 200
    s = run(tmp_path, "--packets", str(n), "--guest-fault", fault)
    assert s["host"]["received"] == n - 1 and s["host"]["duplicates"] == 0
    tx = kernel_vq(s, 1)
    assert tx["errors"] == 1 and tx["last_error"].startswith(kernel_message), tx
    q = s["vhost"]["qemu"]
    assert q["vring_errors"] == 1 and (q["starts"], q["stops"]) == (2, 2)
    assert s["device_errors"] == ["vhost vring error in virtqueue 1: Invalid argument (22)"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("args", "why"), [
    (["--ioeventfd", "off"], "host notifiers"),
])
def test_vhost_refuses_what_vhost_net_cannot_do(args: list[str], why: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "vreplica.cli", "run", "--netdev", "tap",
                           "--vhost", "on", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=25)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and why in proc.stderr, proc.stderr


@pytest.mark.timeout(90)
def test_vhost_over_intx(tmp_path: Path) -> None:
    """Without MSI-X QEMU 7.2 gives vhost no irqfd (with_irqfd needs MSI-X): each queue's
    call eventfd is a guest notifier QEMU's main loop reads (virtio_queue_guest_notifier_read
    -> virtio_irq), raising INTx with KVM_IRQ_LINE_STATUS; every echo round trip completes."""
    n = 200
    s = run(tmp_path, "--mode", "echo", "--packets", str(n), "--window", "8", "--vectors", "0")
    assert s["interrupt_mode"] == "intx"
    assert (s["replies"], s["bad_replies"], s["duplicate_replies"]) == (n, 0, 0)
    rx, tx = kernel_vq(s, 0), kernel_vq(s, 1)
    assert rx["packets"] >= n and tx["packets"] >= n and rx["signals"] and tx["signals"]
    assert s["exits"]["irqfd_signals"] == 0 and s["exits"]["irq_lines"] > 0
    assert s["interrupts_taken"]["shared"] > 0


@pytest.mark.timeout(90)
def test_vhost_two_queue_pairs_exactly_both_ways(tmp_path: Path) -> None:
    """``--queues 2``: a multiqueue tap, one vhost device and worker per queue pair (the
    control queue stays in QEMU); every echo request and reply and every datagram of the
    host's inbound stream arrives once, and both pairs' workers carried traffic."""
    out = tmp_path / "verdict.json"
    n = 3000
    proc = subprocess.run([sys.executable, "-m", "vreplica.cli", "stress", "--no-progress",
                           "--netdev", "tap", "--vhost", "on", "--queues", "2", "--mode",
                           "both", "--packets", str(n), "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    v = json.loads(out.read_text())
    assert (v["sent"], v["delivered"], v["lost"], v["duplicated"]) == (n, n, 0, 0)
    assert v["inbound_sent"] > 0 and v["inbound_received"] == v["inbound_sent"]
    pairs = v["vhost_packets"]
    assert len(pairs) == 2 and all(rx > 0 and tx > 0 for rx, tx in pairs), pairs
    assert sum(tx for _, tx in pairs) >= n


@pytest.mark.timeout(90)
def test_packed_on_with_vhost_gives_the_guest_a_split_ring(tmp_path: Path) -> None:
    """QEMU's packed=on with vhost=on: vhost-net does not offer VIRTIO_F_RING_PACKED, so
    vhost_get_features takes it from what the device offers; the guest negotiates VERSION_1
    and a split ring, which the kernel serves."""
    s = run(tmp_path, "--transport", "modern", "--ring", "packed", "--mode", "echo",
            "--packets", "20")
    assert s["ring"] == "split" and s["replies"] == 20
    (dev,) = s["vhost"]["kernel"]
    acked = int(dev["features"], 16)
    assert acked & (1 << VIRTIO_F_VERSION_1) and not acked & (1 << VIRTIO_F_RING_PACKED)
    assert sum(v["kicks"] for v in dev["vqs"]) > 0


def _wait_for_worker(sup: Supervisor, rundir: str, packets: int) -> psutil.Process:
    """The device's worker process, once it has moved ``packets`` TX frames."""
    deadline = time.monotonic() + 30
    d: dict = {}
    while time.monotonic() < deadline:
        try:
            d = query(rundir, "kvm", "info vhost")
            if d["open"] and d["open"][0]["vqs"][1]["packets"] >= packets:
                break
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.05)
    (dev,) = d["open"]
    assert dev["vqs"][1]["packets"] >= packets, "vhost moved no traffic"
    worker = psutil.Process(dev["worker_pid"])
    assert worker.ppid() == sup.procs["kvm"].pid
    assert worker.name() == dev["worker"] == f"vhost-{sup.procs['qemu'].pid}"
    return worker


@pytest.mark.timeout(90)
def test_vhost_worker_is_a_process_listed_by_ps_and_its_death_fails_the_run() -> None:
    """The worker is a process of its own (the KVM process's child ``vhost-<QEMU pid>``),
    listed by ``vreplica ps``; kill -9 of it ends the run with a one-line reason naming it,
    and leaves nothing behind."""
    opts = RunOptions(mode="tx", packets=10_000_000, timeout=60, dest_port=9,
                      extra={"netdev": "tap", "vhost": True, "csum": True})
    sup = Supervisor(opts)
    try:
        cfg = sup.start()
        worker = _wait_for_worker(sup, cfg.rundir, 500)
        ps = subprocess.run([sys.executable, "-m", "vreplica.cli", "ps", "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
        (run_row,) = [r for r in json.loads(ps.stdout)["runs"] if r["run"] == cfg.rid]
        assert [(p["role"], p["pid"]) for p in run_row["processes"] if p["role"] == "vhost"] \
            == [("vhost", worker.pid)]
        name = worker.name()
        worker.send_signal(signal.SIGKILL)
        with pytest.raises(RunFailed) as e:
            sup.wait()
        why = str(e.value)
        assert len(why.splitlines()) == 1
        assert f"vhost-net worker {name} (pid {worker.pid}) died: killed by SIGKILL" in why, why
    finally:
        sup.stop()
        sup.cleanup()


@pytest.mark.timeout(90)
def test_vhost_worker_dies_with_the_kvm_process() -> None:
    """kill -9 of the KVM process takes its worker with it (PR_SET_PDEATHSIG); the run
    fails and nothing is left."""
    opts = RunOptions(mode="tx", packets=10_000_000, timeout=60, dest_port=9,
                      extra={"netdev": "tap", "vhost": True, "csum": True})
    sup = Supervisor(opts)
    try:
        cfg = sup.start()
        worker = _wait_for_worker(sup, cfg.rundir, 500)
        psutil.Process(sup.procs["kvm"].pid).send_signal(signal.SIGKILL)
        with pytest.raises(RunFailed) as e:
            sup.wait()
        assert "kvm process" in str(e.value) and "SIGKILL" in str(e.value)
        worker.wait(10)
        assert not worker.is_running()
    finally:
        sup.stop()
        sup.cleanup()
