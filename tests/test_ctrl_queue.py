"""The control queue with one queue pair, as QEMU 7.2 offers it (VIRTIO_NET_F_CTRL_VQ and
VIRTIO_NET_F_CTRL_RX by default) and Linux 6.1 uses it when the interface comes up: two
``virtnet_set_rx_mode`` calls (at ``dev_open`` and when IPv4 joins 224.0.0.1), each
RX_PROMISC, RX_ALLMULTI and MAC_TABLE_SET. The real run (``qemu-7.2-tcg/trace-legacy-bh.log``)
shows CTRL(q2) with 6 pops (out_num 2, 2, 3, 2, 2, 3), 7 kicks handled (QEMU's own kick when
ioeventfd starts, then one per command) and 1 interrupt.

Then the device's command handlers and receive filter on their own (hw/net/virtio-net.c's
``virtio_net_handle_ctrl_iov`` and ``receive_filter``), fed scatter lists directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_run_tx import run_cli_inline

from common.virtio_abi import (
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_CTRL_VLAN_ADD,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_OK,
)
from qemuproc.main_loop import MainLoop
from qemuproc.virtio import VirtQueueElement
from qemuproc.virtio_net import (
    CTRL_HANDLERS,
    MAC_TABLE_ENTRIES,
    VirtIONet,
    receive_filter,
    virtio_net_handle_ctrl_iov,
)

OWN = bytes.fromhex("525400123456")
OTHER = bytes.fromhex("525400abcdef")
ALL_HOSTS = bytes.fromhex("01005e000001")
BCAST = b"\xff" * 6


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize("ioeventfd", ["on", "off"])
def test_linux_sets_the_rx_filter_over_the_control_queue_at_link_up(
        ioeventfd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = run_cli_inline(["--packets", "5", "--ioeventfd", ioeventfd], tmp_path, monkeypatch)
    guest, qemu = run.reports["guest"], run.reports["qemu"]
    assert guest["features"] & (1 << VIRTIO_NET_F_CTRL_VQ)
    assert guest["features"] & (1 << VIRTIO_NET_F_CTRL_RX)
    assert guest["ctrl_failures"] == 0
    ctrl = qemu["queues"]["CTRL(q2)"]
    assert ctrl["pops"] == 6
    # QEMU kicks every queue itself when its ioeventfds start (an event_notifier_set on the
    # queue's eventfd), then one kick per command; kicks that meet in the eventfd before the
    # main loop reads it are one read, one handler run
    if ioeventfd == "on":
        assert ctrl["kicks_handled"] + ctrl["kicks_coalesced"] == 7
        assert ctrl["kicks_handled"] >= 1
    else:
        assert (ctrl["kicks_handled"], ctrl["kicks_coalesced"]) == (6, 0)
    # the driver never moves used_event on a queue without a callback: one interrupt
    assert ctrl["notifies"] == 1
    vnet = qemu["virtio_net"]
    assert vnet["ctrl_commands"] == 6
    f = vnet["rx_filter"]
    assert not f["promisc"] and not f["allmulti"]
    assert f["mac_table"] == [ALL_HOSTS.hex()] and f["first_multi"] == 0
    assert run.summary["delivered"] == 5


# -- the device alone ----------------------------------------------------------------------------


@pytest.fixture
def n() -> VirtIONet:
    dev = VirtIONet(None, MainLoop(), mac=OWN)  # type: ignore[arg-type]
    dev.set_features(dev.host_features)
    return dev


def command(n: VirtIONet, cls: int, cmd: int, *out: bytes) -> int:
    """One command through virtio_net_handle_ctrl_iov; the status byte it wrote."""
    elem = VirtQueueElement(0)
    elem.out_sg = [memoryview(bytes([cls, cmd]))] + [memoryview(b) for b in out]
    status = bytearray([0xFF])
    elem.in_sg = [memoryview(status)]
    assert virtio_net_handle_ctrl_iov(n, elem) == 1
    return status[0]


def table(*macs: bytes) -> bytes:
    return len(macs).to_bytes(4, "little") + b"".join(macs)


def frame(dst: bytes, vlan: int | None = None) -> bytes:
    tag = b"" if vlan is None else b"\x81\x00" + vlan.to_bytes(2, "big")
    return dst + OTHER + tag + b"\x08\x00" + bytes(46)


@pytest.mark.timeout(10)
def test_receive_filter_follows_the_commands(n: VirtIONet) -> None:
    assert n.promisc and receive_filter(n, frame(OTHER))  # after reset: compatibility mode
    assert command(n, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0") == VIRTIO_NET_OK
    assert command(n, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table(),
                   table(ALL_HOSTS)) == VIRTIO_NET_OK
    assert receive_filter(n, frame(OWN)) and receive_filter(n, frame(BCAST))
    assert receive_filter(n, frame(ALL_HOSTS))
    assert not receive_filter(n, frame(OTHER))
    assert not receive_filter(n, frame(bytes.fromhex("01005e000002")))
    assert command(n, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\1") == VIRTIO_NET_OK
    assert receive_filter(n, frame(bytes.fromhex("01005e000002")))
    assert command(n, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, b"\1") == VIRTIO_NET_OK
    assert not receive_filter(n, frame(BCAST))
    assert command(n, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table(OTHER),
                   table()) == VIRTIO_NET_OK
    assert receive_filter(n, frame(OTHER))
    n.reset()
    assert n.promisc and n.mac_table.macs == [] and not n.nobcast


@pytest.mark.timeout(10)
def test_vlan_filter_blocks_tagged_frames_until_added(n: VirtIONet) -> None:
    command(n, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0")
    assert not receive_filter(n, frame(OWN, vlan=5))
    assert command(n, VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD,
                   (5).to_bytes(2, "little")) == VIRTIO_NET_OK
    assert receive_filter(n, frame(OWN, vlan=5)) and not receive_filter(n, frame(OWN, vlan=6))
    assert command(n, VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD,
                   (4096).to_bytes(2, "little")) == VIRTIO_NET_ERR
    n.set_features(n.host_features & ~(1 << VIRTIO_NET_F_CTRL_VLAN))
    assert receive_filter(n, frame(OWN, vlan=6))  # no VLAN filtering negotiated: all pass


@pytest.mark.timeout(10)
def test_bad_commands_answer_err_and_change_nothing(n: VirtIONet) -> None:
    before = list(n.mac_table.macs)
    bad = [
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, (3).to_bytes(4, "little") + OWN,
         table()),  # 3 unicast entries announced, 1 present
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table(), table(ALL_HOSTS) + b"x"),
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, b"\1\0"),
        (VIRTIO_NET_CTRL_RX, 99, b"\1"),
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC),
        (max(CTRL_HANDLERS) + 1, 0, b"\0"),
    ]
    for cls, cmd, *out in bad:
        assert command(n, cls, cmd, *out) == VIRTIO_NET_ERR, (cls, cmd, out)
    assert n.mac_table.macs == before and n.promisc and not n.broken


@pytest.mark.timeout(10)
def test_a_table_too_big_turns_overflow_on(n: VirtIONet) -> None:
    many = [bytes([0x01, 0, 0x5E, 0, i >> 8, i & 0xFF]) for i in range(MAC_TABLE_ENTRIES + 1)]
    assert command(n, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, table(OTHER),
                   table(*many)) == VIRTIO_NET_OK
    assert n.mac_table.multi_overflow and not n.mac_table.uni_overflow
    assert n.mac_table.macs == [OTHER]
    command(n, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\0")
    assert receive_filter(n, frame(bytes.fromhex("01005e7f0000")))  # any multicast now


@pytest.mark.timeout(10)
def test_a_command_without_headers_breaks_the_device(n: VirtIONet) -> None:
    elem = VirtQueueElement(0)
    elem.out_sg = [memoryview(b"\0")]
    elem.in_sg = [memoryview(bytearray(1))]
    assert virtio_net_handle_ctrl_iov(n, elem) == 0
    assert n.broken and "ctrl missing headers" in n.broken_reason
