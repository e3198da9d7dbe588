"""`vreplica stress`: sustained load both ways over two queue pairs with chaos on; the
verdict must show nothing lost unexpectedly, nothing leaked, memory steady."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.netns import privilege_problem
from vreplica.stress.stress import SmoothedRate, chaos_row, progress_line

pytestmark = pytest.mark.usefixtures("no_leftovers")


def stress(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[int, dict, str]:
    out = tmp_path / "verdict.json"
    proc = subprocess.run([sys.executable, "-m", "vreplica.cli", "stress", "--no-progress",
                           "--json", str(out), *args], capture_output=True, text=True,
                          timeout=timeout)
    verdict = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, verdict, proc.stdout + proc.stderr


MODES = ("tx", "echo", "both")
CHAOS = ("guest-pause", "echo-pause", "kill-device", "ring-fault", "all")
LOSSY = ("ring-fault", "kill-device")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("queues", (1, 2))
@pytest.mark.parametrize("chaos", CHAOS)
@pytest.mark.parametrize("mode", MODES)
def test_stress_matrix(tmp_path: Path, mode: str, chaos: str, queues: int) -> None:
    """Each chaos kind alone and all together, in each direction, over one and two queue
    pairs: the verdict passes, and every datagram lost is one the chaos lost, named event by
    event: a paused guest or echo service loses nothing in flight (the net queue and rings
    hold it), a ring fault its faulted frame and what its reset dropped, a restart what the
    dead QEMU held."""
    code, v, text = stress(tmp_path, "--duration", "2", "--queues", str(queues),
                           "--mode", mode, "--chaos", chaos, "--chaos-period", "0.6")
    check_cell(code, v, text, mode, chaos)


def check_cell(code: int, v: dict, text: str, mode: str, chaos: str) -> None:
    """What every matrix cell's verdict must show."""
    assert code == 0, text
    assert v["verdict"] == "PASS" and v["reasons"] == []
    assert v["sent"] > 500
    kinds = {e["kind"] for e in v["chaos"]}
    if chaos == "all":
        assert kinds, "no chaos event fired"
    elif not (chaos == "echo-pause" and mode == "tx"):  # no echo service to pause in tx
        assert kinds == {chaos}, v["chaos"]
    assert v["lost_unexpected"] == 0 and v["inbound_lost_unexpected"] == 0
    assert v["unexplained_runs"] == [] and v["inbound_unexplained_runs"] == []
    assert v["bad_payloads"] == 0 and v["leftovers"] == []
    events_lost = sum(e["lost"] for e in v["chaos"])
    if "kill-device" not in kinds:  # a restart may deliver a frame twice
        assert v["duplicated"] == 0
        assert events_lost == v["lost_expected"] + v["inbound_lost_expected"], v["chaos"]
    for e in v["chaos"]:
        if e["kind"] in ("guest-pause", "echo-pause"):  # the rings, net queue, socket hold it
            assert e["lost"] == 0, e
        if e["kind"] == "ring-fault" and "faulted_seq" in e:
            assert e["down_ms"] is not None and e["rx_down_ms"] <= e["down_ms"], e
    if mode == "both":
        assert v["inbound_received"] > 0
        assert v["inbound_received"] + v["inbound_lost"] == v["inbound_sent"]
    assert v["lost"] == v["sent"] - v["delivered"]
    if not kinds & set(LOSSY):
        assert v["inbound_lost"] == 0
        assert v["lost"] == 0
    # a fault asked for as the guest stops sending is never committed: no reset follows
    assert v["resets"] <= sum(1 for e in v["chaos"] if e["kind"] == "ring-fault")
    assert v["device_restarts"] == sum(1 for e in v["chaos"] if e["kind"] == "kill-device")
    if "ring-fault" in kinds and v["resets"]:  # QEMU's virtio_error lines, counted not shown
        assert sum(v["device_error_lines"].values()) >= v["resets"], v["device_error_lines"]
        assert "virtio-net:" not in text.split("  mode ")[0]
    if chaos == "ring-fault":
        # QEMU's and the guest's own counts agree: what the resets lost is what the net queue's
        # flush at DRIVER_OK dropped, what the guest threw away unprocessed, and the TX skbs the
        # reset freed unsent (free_unused_bufs), the faulted frames among them
        faulted = sum(1 for e in v["chaos"] if "faulted_seq" in e)
        unprocessed = sum(e.get("rx_unprocessed", 0) for e in v["chaos"])
        unsent = sum(e.get("tx_unsent", 0) for e in v["chaos"])
        assert unsent >= faulted, v["chaos"]
        assert events_lost == v["netqueue_dropped_at_driver_ok"] + unprocessed + unsent, v


@pytest.mark.timeout(90)
def test_tx_stress_counts_every_datagram(tmp_path: Path) -> None:
    """No chaos: every sequence number sent reaches the host sink once, per-flow in order."""
    code, v, text = stress(tmp_path, "--packets", "20000", "--queues", "2", "--mode", "tx",
                           "--sizes", "0-1472")
    assert code == 0, text
    assert v["sent"] == 20000 and v["delivered"] == 20000
    assert v["lost"] == 0 and v["duplicated"] == 0 and v["reordered"] == 0
    assert v["sizes"] == [8, 1472]  # the sequence number needs 8 bytes


@pytest.mark.timeout(90)
def test_stress_on_packed_rings_with_chaos(tmp_path: Path) -> None:
    """The packed ring under load both ways over two queue pairs with every chaos kind: ring
    faults written the packed ring's way, QEMU killed and taken over from the packed inflight
    record, guest and echo pauses. The verdict passes: every datagram lost is one an event
    lost, and the device came back from each."""
    code, v, text = stress(tmp_path, "--duration", "3", "--queues", "2", "--mode", "both",
                           "--transport", "modern", "--ring", "packed",
                           "--chaos", "all", "--chaos-period", "0.6")
    assert code == 0, text
    assert v["verdict"] == "PASS" and v["reasons"] == []
    assert v["sent"] > 500 and v["inbound_received"] > 0
    assert v["lost_unexpected"] == 0 and v["inbound_lost_unexpected"] == 0
    assert v["unexplained_runs"] == [] and v["inbound_unexplained_runs"] == []
    assert v["bad_payloads"] == 0 and v["leftovers"] == []
    assert v["device_restarts"] == sum(1 for e in v["chaos"] if e["kind"] == "kill-device")
    assert v["resets"] <= sum(1 for e in v["chaos"] if e["kind"] == "ring-fault")


@pytest.mark.timeout(90)
def test_a_failed_run_writes_its_verdict_so_far(tmp_path: Path) -> None:
    """KVM killed -9 mid-run: the run fails in one line, and --json still gets what it had
    measured, with that line as the reason; nothing is left behind."""
    out = tmp_path / "verdict.json"
    p = subprocess.Popen([sys.executable, "-m", "vreplica.cli", "stress", "--no-progress",
                          "--json", str(out), "--duration", "60", "--mode", "both"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        kvm = None
        deadline = time.monotonic() + 30
        while kvm is None and time.monotonic() < deadline:
            kvm = next((c for c in psutil.Process(p.pid).children()
                        if "kvmproc" in " ".join(c.cmdline())), None)
            time.sleep(0.05)
        assert kvm is not None, "the run's KVM process did not start"
        kvm.kill()
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1
    v = json.loads(out.read_text())
    assert v["verdict"] == "FAIL"
    assert err == f"vreplica stress: {v['reasons'][0]}\n"
    assert v["reasons"][0].startswith(f"kvm process (pid {kvm.pid}) died: killed by SIGKILL")
    assert v["leftovers"] == [] and v["mode"] == "both"
    assert v["sent"] >= v["delivered"] >= 0


def test_the_progress_figures_are_the_verdicts_and_steady() -> None:
    """The bar names what it counts as the verdict does; the rate, from reports every 0.5 s
    that arrive unevenly (0.2 s and 0.8 s apart), stays near the true 10k/s."""
    rate = SmoothedRate()
    t = count = 0.0
    seen = []
    for k in range(40):
        t += 0.2 if k % 2 else 0.8
        count += 5000
        rate.update(int(count), t)
        seen.append(rate.rate)
    assert all(7_000 < r < 14_000 for r in seen[10:]), seen
    line = progress_line("both", {"sent": 100, "replies": 90, "awaiting": 10, "inbound": 5},
                         10_000.0, 2_000.0, 0, 7)
    assert line == ("sent 100 (10,000/s), replies 90, awaiting 10, inbound 5 of 7, "
                    "VM exits 2,000/s")
    assert "at the host's sink 42" in progress_line("tx", {"sent": 50}, 0.0, 0.0, 42, 0)


def test_a_long_runs_chaos_is_told_per_kind() -> None:
    events = [{"t_s": float(t), "kind": ("kill-device", "echo-pause")[t % 2],
               "lost": 10 * t if t % 2 == 0 else 0} for t in range(20)]
    assert chaos_row(events[:2]) == "0.0s kill-device, 1.0s echo-pause"
    assert chaos_row(events) == ("20: kill-device 10 (lost 900, at most 180 by one), "
                                 "echo-pause 10 (lost 0)")


def test_bad_stress_options_one_line_exit_2(tmp_path: Path) -> None:
    for args in (["--chaos", "meteor"], ["--sizes", "9-3"], ["--queues", "0"],
                 ["--ring", "packed"]):
        proc = subprocess.run([sys.executable, "-m", "vreplica.cli", "stress", *args],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr




@pytest.mark.timeout(90)
@pytest.mark.skipif(privilege_problem() is not None,
                    reason=f"--netdev tap: {privilege_problem()}")
@pytest.mark.parametrize(("netdev", "mode", "chaos", "queues"), [
    (["--netdev", "tap"], "both", "all", 2),
    (["--netdev", "tap", "--vhost", "on"], "both", "all", 2),
    (["--netdev", "tap", "--vhost", "on"], "tx", "kill-device", 1),
], ids=["tap-both-all-2", "vhost-both-all-2", "vhost-tx-kill-device-1"])
def test_stress_over_tap(tmp_path: Path, netdev: list[str], mode: str, chaos: str,
                         queues: int) -> None:
    """The same verdict over a real tap, the host's services in the run's namespace, and with
    vhost-net: a ring fault is found by vhost's vq_err and the guest's reset goes through
    vhost_net_stop/vhost_net_start; a QEMU killed -9 takes its vhost devices with it and the
    new QEMU sets vhost up again from the rings (one device per queue pair)."""
    code, v, text = stress(tmp_path, "--duration", "2", "--queues", str(queues), "--mode", mode,
                           "--chaos", chaos, "--chaos-period", "0.6", *netdev)
    check_cell(code, v, text, mode, chaos)
    if "--vhost" in netdev and chaos == "kill-device":
        assert v["device_restarts"] >= 1
