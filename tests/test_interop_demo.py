"""``vreplica demo --peer dpdk``: a ping's round trip through the replica's guest, KVM and
QEMU and dpdk-testpmd's vhost library (icmpecho)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DPDK_RUN = Path("/var/run/dpdk")


def demo(tmp_path: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vreplica.cli", "demo", "--peer", "dpdk",
                           "--out", str(tmp_path / "out"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def dpdk_dirs() -> set[str]:
    return {p.name for p in DPDK_RUN.glob("vnr-demo-*")} if DPDK_RUN.is_dir() else set()


@pytest.mark.timeout(200)
def test_round_trip_through_testpmd(tmp_path: Path, no_leftovers: object) -> None:
    before = dpdk_dirs()
    r = demo(tmp_path, "--packets", "4")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    guest = re.search(r"the guest\s+sent (\d+) frames, got (\d+); (\d+) of 4 echo replies", out)
    port = re.search(r"testpmd \(port 0\)\s+received (\d+), sent (\d+)", out)
    assert guest and port, out
    assert int(guest.group(3)) == 4
    assert (port.group(1), port.group(2)) == (guest.group(1), guest.group(2))
    assert int(guest.group(1)) >= 4 and int(guest.group(2)) >= 4
    steps = [m.group(1) for m in re.finditer(r"^\s+\d+us\s+\w+\s+(\w+)", out, re.M)]
    assert steps[0] == "net_dev_xmit" and steps[-1] == "ip_rcv", out
    for step in ("virtqueue_add_split", "irqfd_wakeup", "kvm_inj_virq", "irq_handler_entry",
                 "receive_buf"):
        assert step in steps, out
    assert steps.index("virtqueue_add_split") < steps.index("irqfd_wakeup") \
        < steps.index("irq_handler_entry") < steps.index("receive_buf")
    assert "rte_vhost_dequeue_burst" in out
    assert (tmp_path / "out" / "trace.json").stat().st_size > 0
    assert dpdk_dirs() <= before, "testpmd's runtime directory was left behind"


@pytest.mark.timeout(60)
def test_peer_dpdk_refuses_another_netdev(tmp_path: Path) -> None:
    r = demo(tmp_path, "--netdev", "tap")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--peer dpdk" in r.stderr
    assert not (tmp_path / "out").exists()
