"""`vreplica stress`: sustained load both ways over two queue pairs with chaos on; the
verdict must show nothing lost unexpectedly, nothing leaked, memory steady."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.netns import privilege_problem

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
