"""`vreplica stress`: sustained load both ways over two queue pairs with chaos on; the
verdict must show nothing lost unexpectedly, nothing leaked, memory steady."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("no_leftovers")


def stress(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[int, dict, str]:
    out = tmp_path / "verdict.json"
    proc = subprocess.run([sys.executable, "-m", "vreplica.cli", "stress", "--no-progress",
                           "--json", str(out), *args], capture_output=True, text=True,
                          timeout=timeout)
    verdict = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, verdict, proc.stdout + proc.stderr


@pytest.mark.timeout(150)
def test_short_stress_with_chaos_two_queue_pairs(tmp_path: Path) -> None:
    """15 s over two queue pairs while the device process is killed and restarted, the guest
    corrupts its ring and resets the device, and the guest is paused: only the frames that
    carried a fault are lost; a restart may duplicate at most a queue's worth."""
    code, v, text = stress(tmp_path, "--duration", "15", "--queues", "2", "--mode", "tx",
                           "--chaos", "kill-device,ring-fault,guest-pause",
                           "--chaos-period", "2")
    assert code == 0, text
    assert v["verdict"] == "PASS"
    assert v["sent"] > 1000
    assert v["lost_unexpected"] == 0
    faults = sum(1 for e in v["chaos"] if e["kind"] == "ring-fault")
    assert v["lost"] == v["lost_expected"] <= faults
    assert v["duplicated"] <= v["device_restarts"] * 256
    assert v["device_restarts"] == sum(1 for e in v["chaos"] if e["kind"] == "kill-device")
    assert v["reordered"] == 0 and v["bad_payloads"] == 0
    assert v["chaos"], "chaos was asked for but no event fired"
    assert v["leftovers"] == []
    for role in ("guest", "kvm", "qemu"):
        assert v["rss_end_mb"][role] - v["rss_start_mb"][role] < 20, (role, v)


@pytest.mark.timeout(120)
def test_stress_both_directions_with_pauses(tmp_path: Path) -> None:
    """Echo plus a host -> guest stream; replies the paused echo service ignored are the
    only loss, and the verdict says so."""
    code, v, text = stress(tmp_path, "--duration", "8", "--queues", "2", "--mode", "both",
                           "--chaos", "guest-pause,echo-pause", "--chaos-period", "1.5")
    assert code == 0, text
    assert v["verdict"] == "PASS"
    assert v["sent"] > 1000
    assert v["lost_unexpected"] == 0
    assert v["lost"] == v["lost_expected"]
    assert v["inbound_sent"] > 0 and v["inbound_lost"] == 0
    assert v["duplicated"] == 0 and v["bad_payloads"] == 0
    assert v["chaos"], "chaos was asked for but no event fired"
    assert v["leftovers"] == []
    for role in ("guest", "kvm", "qemu"):
        assert v["rss_end_mb"][role] - v["rss_start_mb"][role] < 20, (role, v)
    assert "verdict" in text and "PASS" in text


@pytest.mark.timeout(90)
def test_tx_stress_counts_every_datagram(tmp_path: Path) -> None:
    """No chaos: every sequence number sent reaches the host sink once, per-flow in order."""
    code, v, text = stress(tmp_path, "--packets", "20000", "--queues", "2", "--mode", "tx",
                           "--sizes", "0-1472")
    assert code == 0, text
    assert v["sent"] == 20000 and v["delivered"] == 20000
    assert v["lost"] == 0 and v["duplicated"] == 0 and v["reordered"] == 0
    assert v["sizes"] == [8, 1472]  # the sequence number needs 8 bytes


def test_bad_stress_options_one_line_exit_2(tmp_path: Path) -> None:
    for args in (["--chaos", "meteor"], ["--sizes", "9-3"], ["--queues", "0"]):
        proc = subprocess.run([sys.executable, "-m", "vreplica.cli", "stress", *args],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


