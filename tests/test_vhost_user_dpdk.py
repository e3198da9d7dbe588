"""The replica's QEMU as vhost-user front-end against a real back end: DPDK's vhost library
in testpmd (``--vdev net_vhost0,iface=SOCK``), answering ARP and ICMP (icmpecho) or sending
every UDP datagram back with addresses and ports swapped (5tswap).

QEMU's spelling connects them (``-chardev socket,id=c0,path=SOCK -netdev
vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0``). Each run checks what the
guest's driver counted against what testpmd's port counted, frame for frame: every frame the
guest sent reached testpmd and every frame testpmd sent reached the guest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testpmd import DpdkTestpmd

from common.virtio_abi import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "vhost-user.sock"


@pytest.fixture
def testpmd_factory(sock: Path) -> Iterator[Any]:
    started: list[DpdkTestpmd] = []

    def start(mode: str, queues: int = 1) -> DpdkTestpmd:
        tp = DpdkTestpmd(sock, queues=queues, mode=mode)
        started.append(tp)
        tp.start()
        return tp

    yield start
    for tp in started:
        tp.stop()
        assert not tp.child.isalive()


def vreplica(tmp_path: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vreplica.cli", "run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def run_against(tmp_path: Path, sock: Path, *args: str, queues: int = 1) -> dict[str, Any]:
    out = tmp_path / f"summary-{time.monotonic_ns()}.json"
    netdev = f"vhost-user,id=n0,chardev=c0,queues={queues}"
    device = "virtio-net-pci,netdev=n0" + (",mq=on" if queues > 1 else "")
    proc = vreplica(tmp_path, "-chardev", f"socket,id=c0,path={sock}", "-netdev", netdev,
                    "-device", device, "--summary-json", str(out), "--timeout", "60", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def assert_frame_for_frame(s: dict[str, Any], port: dict[str, int]) -> None:
    vu = s["vhost_user"]
    assert sum(vu["guest_tx_frames"]) == port["rx"], (vu, port)
    assert sum(vu["guest_rx_frames"]) == port["tx"], (vu, port)
    assert vu["qemu"]["started"] and not vu["qemu"]["link_down"]
    assert s["device_errors"] == []


def test_arp_and_icmp_echo_through_testpmd(tmp_path: Path, sock: Path, no_leftovers: Any,
                                           testpmd_factory: Any) -> None:
    """The guest resolves 10.0.2.2 by ARP and pings it; testpmd's vhost port answers both."""
    tp = testpmd_factory("icmpecho")
    s = run_against(tmp_path, sock, "--mode", "ping", "--packets", "5")
    port = tp.port_stats()
    assert s["replies"] == 5
    assert_frame_for_frame(s, port)
    assert port["rx"] == 6 and port["tx"] == 6  # one ARP request and reply, five echoes


@pytest.mark.parametrize("extra,features_on,features_off", [
    (["--event-idx", "on", "--mrg-rxbuf", "off"], [VIRTIO_RING_F_EVENT_IDX],
     [VIRTIO_NET_F_MRG_RXBUF]),
    (["--event-idx", "off", "--mrg-rxbuf", "on"], [VIRTIO_NET_F_MRG_RXBUF],
     [VIRTIO_RING_F_EVENT_IDX]),
    (["--transport", "modern", "--ring", "packed", "--mrg-rxbuf", "on"],
     [VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_NET_F_MRG_RXBUF], []),
    (["--transport", "modern", "--ring", "packed", "--event-idx", "off"],
     [VIRTIO_F_RING_PACKED], [VIRTIO_RING_F_EVENT_IDX]),
    (["--vectors", "0"], [], []),
], ids=["split-eventidx", "split-mrgrxbuf", "packed-mrgrxbuf", "packed-noeventidx", "intx"])
def test_udp_both_ways_through_testpmd(tmp_path: Path, sock: Path, no_leftovers: Any,
                                       testpmd_factory: Any, extra: list[str],
                                       features_on: list[int],
                                       features_off: list[int]) -> None:
    """300 datagrams to 10.0.2.2, each sent back by testpmd (5tswap) and checked by the
    guest's echo client; the guest knows 10.0.2.2's MAC (5tswap answers no ARP)."""
    tp = testpmd_factory("5tswap")
    s = run_against(tmp_path, sock, "--mode", "echo", "--static-arp", "--packets", "300",
                    "--window", "8", "--size", "256", *extra)
    port = tp.port_stats()
    assert s["replies"] == 300 and s["bad_replies"] == 0
    assert_frame_for_frame(s, port)
    assert port["rx"] == 300
    features = s["vhost_user"]["guest_features"]
    for bit in features_on:
        assert features >> bit & 1, f"feature {bit} not negotiated: {features:#x}"
    for bit in features_off:
        assert not features >> bit & 1, f"feature {bit} negotiated: {features:#x}"


@pytest.mark.parametrize("transport", [["--transport", "modern"], []], ids=["modern", "legacy"])
def test_two_queue_pairs_through_testpmd(tmp_path: Path, sock: Path, no_leftovers: Any,
                                         testpmd_factory: Any, transport: list[str]) -> None:
    """queues=2: GET_QUEUE_NUM, both pairs' rings given to testpmd, the control queue in QEMU
    (the guest's VIRTIO_NET_CTRL_MQ); each queue's frames match testpmd's per-queue counts."""
    tp = testpmd_factory("5tswap", queues=2)
    s = run_against(tmp_path, sock, "--mode", "echo", "--static-arp", "--packets", "200",
                    "--window", "4", *transport, queues=2)
    port = tp.port_stats()
    per_queue = tp.stream_stats(2)
    vu = s["vhost_user"]
    assert s["replies"] == 200 and s["queue_pairs"] == 2
    assert vu["guest_features"] >> VIRTIO_NET_F_MQ & 1
    assert vu["qemu"]["max_queues"] >= 2
    assert_frame_for_frame(s, port)
    assert per_queue["rx"] == vu["guest_tx_frames"], per_queue["text"]
    assert per_queue["tx"] == vu["guest_rx_frames"], per_queue["text"]


def test_unreachable_socket_is_refused_before_start(tmp_path: Path, no_leftovers: Any) -> None:
    proc = vreplica(tmp_path, "-chardev", f"socket,id=c0,path={tmp_path}/none.sock",
                    "-netdev", "vhost-user,id=n0,chardev=c0",
                    "-device", "virtio-net-pci,netdev=n0", timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Failed to connect" in lines[0], proc.stderr


def test_missing_chardev_is_refused(tmp_path: Path, no_leftovers: Any) -> None:
    proc = vreplica(tmp_path, "-chardev", f"socket,id=c0,path={tmp_path}/s.sock",
                    "-netdev", "vhost-user,id=n0,chardev=c9",
                    "-device", "virtio-net-pci,netdev=n0", timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'chardev "c9" not found' in lines[0], proc.stderr
