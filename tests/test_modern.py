"""The virtio 1.0 (modern) PCI transport: end to end in the three processes, and QEMU's
common-configuration handlers driven register by register the way a hostile driver could
(the hostile guest's own register faults over modern, queue-addr and queue-enable, are in
test_guest_faults).

Port I/O is left to PCI configuration cycles on a modern device: every kick, ISR read and
device register is MMIO. A bounded KVM_EXIT_IO count over a run with hundreds of kicks and
interrupts is what shows that none of them went through a port.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_run_rx import run

from common import virtio_abi as abi
from common.guest_memory import GuestMemory

pytestmark = pytest.mark.usefixtures("no_leftovers")

CONFIG_CYCLE_EXITS = 400
"""More port exits than a modern device's probe takes (PCI config cycles, two exits each)."""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("vectors", ["5", "0"], ids=["msix-per-vq", "intx"])
def test_modern_echo_two_queue_pairs(tmp_path: Path, vectors: str) -> None:
    """Every datagram goes out and its reply comes back, exactly, over two queue pairs and
    the control queue; kicks reach KVM's MMIO ioeventfds and the ISR is read over MMIO."""
    n = 120
    s = run(tmp_path, "--transport", "modern", "--mode", "echo", "--packets", str(n),
            "--size", "300", "--window", "4", "--queues", "2", "--vectors", vectors,
            "--timeout", "60")
    assert s["driver_transport"] == "modern"
    assert s["replies"] == n and s["bad_replies"] == 0 and s["duplicate_replies"] == 0
    assert s["queue_pairs"] == 2 and s["device_errors"] == []
    assert s["interrupt_mode"] == ("intx" if vectors == "0" else "msix-per-vq")
    assert s["exits"]["ioeventfd_signals"] >= s["kicks"] > 0  # each kick KVM's MMIO eventfd
    assert s["userspace_exits"]["KVM_EXIT_IO"] < CONFIG_CYCLE_EXITS
    if vectors == "0":  # the line's handler read the ISR region each time: an MMIO exit
        taken = s["guest_irqs"]["virtio0"]
        assert taken > 0 and s["userspace_exits"]["KVM_EXIT_MMIO"] > taken
        assert s["exits"]["irq_lines"] > 0 and s["exits"]["signal_msis"] == 0


@pytest.mark.timeout(90)
def test_modern_kick_without_ioeventfd_is_an_mmio_exit(tmp_path: Path) -> None:
    """With ioeventfd off each kick leaves KVM as KVM_EXIT_MMIO for QEMU's vCPU thread."""
    n = 60
    s = run(tmp_path, "--transport", "modern", "--ioeventfd", "off", "--packets", str(n),
            "--pace-ms", "1", "--timeout", "40")
    assert s["delivered"] == n and s["ioeventfds"] == 0
    assert s["exits"]["ioeventfd_signals"] == 0
    assert s["kicks_handled"] >= n // 2
    assert s["userspace_exits"]["KVM_EXIT_MMIO"] > s["kicks_handled"]
    assert s["userspace_exits"]["KVM_EXIT_IO"] < CONFIG_CYCLE_EXITS


@pytest.mark.timeout(90)
def test_transitional_device_negotiates_modern(tmp_path: Path) -> None:
    """A device with both interfaces: Linux's probe takes the modern one."""
    s = run(tmp_path, "--transport", "transitional", "--packets", "20", "--timeout", "30")
    assert s["transport"] == "transitional" and s["driver_transport"] == "modern"
    assert s["delivered"] == 20
    assert s["userspace_exits"]["KVM_EXIT_IO"] < CONFIG_CYCLE_EXITS


# -- QEMU's handlers, register by register -------------------------------------------------------


@pytest.fixture
def proxy() -> Iterator[Any]:
    """A modern virtio-net device's proxy over 1 MiB of real guest RAM, without the other
    processes: QEMU's region handlers are called as KVM_EXIT_MMIO would call them."""
    from qemuproc.kvm_all import KVMState
    from qemuproc.memory import AddressSpace
    from qemuproc.pci import PCIHostState
    from qemuproc.virtio import VirtIODevice, virtio_add_queue
    from qemuproc.virtio_pci import VirtIOPCIProxy

    name = f"/vreplica-test-modern-{os.getpid()}"
    mem = GuestMemory(name, 1 << 20, create=True)
    try:
        vdev = VirtIODevice("virtio-net", abi.VIRTIO_ID_NET, 10, mem)
        vdev.host_features = (1 << abi.VIRTIO_NET_F_MAC) | (1 << abi.VIRTIO_F_ACCESS_PLATFORM)
        virtio_add_queue(vdev, 256, lambda d, q: None, "tx")
        io_as, mem_as = AddressSpace("I/O", True), AddressSpace("memory", False)
        p = VirtIOPCIProxy(vdev, PCIHostState(io_as), io_as, mem_as,
                           KVMState(None, None),  # type: ignore[arg-type]
                           None, None, 0, False,  # type: ignore[arg-type]
                           disable_legacy=True, disable_modern=False)
        yield p
        vdev.vq[0].views = None
    finally:
        mem.close()
        GuestMemory.unlink(name)


def _w(p: Any, reg: int, val: int, size: int = 4) -> None:
    from qemuproc.virtio_pci_modern import virtio_pci_common_write

    virtio_pci_common_write(p, reg, val, size)


def _r(p: Any, reg: int, size: int = 4) -> int:
    from qemuproc.virtio_pci_modern import virtio_pci_common_read

    return virtio_pci_common_read(p, reg, size)


def _negotiate(p: Any, features: int) -> int:
    """ACKNOWLEDGE, DRIVER, the features, FEATURES_OK; the status read back."""
    ack = abi.VIRTIO_CONFIG_S_ACKNOWLEDGE | abi.VIRTIO_CONFIG_S_DRIVER
    _w(p, abi.VIRTIO_PCI_COMMON_STATUS, ack, 1)
    for sel in (0, 1):
        _w(p, abi.VIRTIO_PCI_COMMON_GFSELECT, sel)
        _w(p, abi.VIRTIO_PCI_COMMON_GF, (features >> (32 * sel)) & 0xFFFFFFFF)
    _w(p, abi.VIRTIO_PCI_COMMON_STATUS, ack | abi.VIRTIO_CONFIG_S_FEATURES_OK, 1)
    return _r(p, abi.VIRTIO_PCI_COMMON_STATUS, 1)


def _enable_ring(p: Any) -> None:
    """Queue 0's parts at 0x4000 (desc), 0x1000 (avail), 0x2000 (used), then queue_enable."""
    for lo, val in ((abi.VIRTIO_PCI_COMMON_Q_DESCLO, 0x4000),
                    (abi.VIRTIO_PCI_COMMON_Q_AVAILLO, 0x1000),
                    (abi.VIRTIO_PCI_COMMON_Q_USEDLO, 0x2000)):
        _w(p, lo, val)
    _w(p, abi.VIRTIO_PCI_COMMON_Q_ENABLE, 1, 2)


@pytest.mark.timeout(30)
def test_device_features_are_64_bit_and_version_1_offered(proxy: Any) -> None:
    offered = 0
    for sel in (0, 1):
        _w(proxy, abi.VIRTIO_PCI_COMMON_DFSELECT, sel)
        offered |= _r(proxy, abi.VIRTIO_PCI_COMMON_DF) << (32 * sel)
    assert offered == proxy.vdev.host_features
    assert offered >> abi.VIRTIO_F_VERSION_1 & 1 and offered >> abi.VIRTIO_F_ACCESS_PLATFORM & 1
    _w(proxy, abi.VIRTIO_PCI_COMMON_DFSELECT, 2)
    assert _r(proxy, abi.VIRTIO_PCI_COMMON_DF) == 0


@pytest.mark.timeout(30)
def test_features_ok_refused_when_validation_fails(proxy: Any) -> None:
    """virtio_set_status with VERSION_1: a driver that drops VIRTIO_F_ACCESS_PLATFORM the
    device offers does not get FEATURES_OK (virtio_validate_features); one that keeps it
    does. Bits the device never offered are dropped (virtio_set_features), not refused."""
    v1 = 1 << abi.VIRTIO_F_VERSION_1
    status = _negotiate(proxy, v1 | (1 << abi.VIRTIO_NET_F_MAC))
    assert not status & abi.VIRTIO_CONFIG_S_FEATURES_OK
    _w(proxy, abi.VIRTIO_PCI_COMMON_STATUS, 0, 1)  # reset
    unoffered = 1 << abi.VIRTIO_F_RING_PACKED
    status = _negotiate(proxy, v1 | (1 << abi.VIRTIO_F_ACCESS_PLATFORM) | unoffered)
    assert status & abi.VIRTIO_CONFIG_S_FEATURES_OK
    assert proxy.vdev.guest_features == v1 | (1 << abi.VIRTIO_F_ACCESS_PLATFORM)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("desc", "avail", "used", "message"), [
    ((1 << 20) - 16, 0x1000, 0x2000, "Cannot map desc"),
    (0x4000, 0x1000, (1 << 32) | 0x2000, "Cannot map used"),
    (0x4000, (1 << 20) - 8, 0x2000, "Cannot map avail"),
    (0xFFFFFFFFFFFFF000, 0x1000, 0x2000, "Cannot map desc"),
])
def test_bad_queue_addresses_end_in_virtio_error(proxy: Any, desc: int, avail: int, used: int,
                                                 message: str) -> None:
    """64-bit queue addresses outside guest RAM, written lo/hi and enabled: QEMU's message,
    the device broken, no ring mapped; a reset makes it work again."""
    vdev = proxy.vdev
    _w(proxy, abi.VIRTIO_PCI_COMMON_Q_SELECT, 0, 2)
    for lo, val in ((abi.VIRTIO_PCI_COMMON_Q_DESCLO, desc),
                    (abi.VIRTIO_PCI_COMMON_Q_AVAILLO, avail),
                    (abi.VIRTIO_PCI_COMMON_Q_USEDLO, used)):
        _w(proxy, lo, val & 0xFFFFFFFF)
        _w(proxy, lo + 4, val >> 32)
    assert _r(proxy, abi.VIRTIO_PCI_COMMON_Q_DESCHI) == desc >> 32
    _w(proxy, abi.VIRTIO_PCI_COMMON_Q_ENABLE, 1, 2)
    assert vdev.broken and vdev.errors == [message]
    assert vdev.vq[0].views is None
    assert _r(proxy, abi.VIRTIO_PCI_COMMON_STATUS, 1) & abi.VIRTIO_CONFIG_S_NEEDS_RESET
    _w(proxy, abi.VIRTIO_PCI_COMMON_STATUS, 0, 1)
    assert not vdev.broken and _r(proxy, abi.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    _enable_ring(proxy)
    assert not vdev.broken and vdev.vq[0].views is not None
    assert (vdev.vq[0].desc, vdev.vq[0].avail, vdev.vq[0].used) == (0x4000, 0x1000, 0x2000)


@pytest.mark.timeout(30)
def test_notify_write_kicks_the_queue_of_its_address(proxy: Any) -> None:
    """queue_notify_off is the queue index; the notify address is notify + 4 * off."""
    from qemuproc.virtio_pci_modern import virtio_pci_notify_write

    kicked: list[int] = []
    vdev = proxy.vdev
    vdev.vq[0].handle_output = lambda d, q: kicked.append(q.queue_index)
    _w(proxy, abi.VIRTIO_PCI_COMMON_Q_SELECT, 0, 2)
    assert _r(proxy, abi.VIRTIO_PCI_COMMON_Q_NOFF, 2) == 0
    _enable_ring(proxy)
    virtio_pci_notify_write(proxy, 0, 0, 2)
    virtio_pci_notify_write(proxy, abi.QEMU_VIRTIO_PCI_QUEUE_MEM_MULT * 63, 0, 2)  # no queue
    virtio_pci_notify_write(proxy, 0xFFF, 0, 1)  # beyond VIRTIO_QUEUE_MAX: ignored
    assert kicked == [0]


@pytest.mark.timeout(30)
def test_wide_and_odd_accesses_do_not_reach_beyond_the_fields(proxy: Any) -> None:
    """An 8-byte store to queue_desc_lo keeps 32 bits (QEMU's uint32_t field); accesses at
    offsets that start no field, or past the structure, change nothing and read 0."""
    _w(proxy, abi.VIRTIO_PCI_COMMON_Q_SELECT, 0, 2)
    _w(proxy, abi.VIRTIO_PCI_COMMON_Q_DESCLO, 0x1234_5678_0000_4000, 8)
    assert _r(proxy, abi.VIRTIO_PCI_COMMON_Q_DESCLO) == 0x4000
    assert _r(proxy, abi.VIRTIO_PCI_COMMON_Q_DESCHI) == 0
    before = [(q.num, q.enabled, list(q.desc)) for q in proxy.vqs[:2]]
    for addr in (1, 3, 33, 0x3F, 0xFFF):
        _w(proxy, addr, 0xFFFFFFFF, 1)
        assert _r(proxy, addr, 1) == 0
    assert [(q.num, q.enabled, list(q.desc)) for q in proxy.vqs[:2]] == before
    _w(proxy, abi.VIRTIO_PCI_COMMON_Q_SELECT, 0xFFFF, 2)  # beyond VIRTIO_QUEUE_MAX: kept
    assert _r(proxy, abi.VIRTIO_PCI_COMMON_Q_SELECT, 2) == 0
