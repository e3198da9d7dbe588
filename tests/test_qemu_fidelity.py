"""QEMU 7.2's small rules, in process: MSI-X vectors in use (msix_notify), mask changes to the
vector notifiers (msix_fire_vector_notifier), INTX_DISABLE (pci_irq_handler), features after
FEATURES_OK (virtio_set_features), the config generation (virtio_notify_config), and a packed
ring's used wrap forgetting the last signalled position (virtqueue_packed_flush)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from ringmock import guest_memory, make_packed_device, release_packed_device

from common.guest_memory import GuestMemory
from common.virtio_abi import (
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_ID_NET,
    VIRTIO_RING_F_EVENT_IDX,
)
from common.vring_mock import MockPackedQueue
from qemuproc.pci import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_STATUS,
    PCI_STATUS_INTERRUPT,
    PCIDevice,
)
from qemuproc.virtio import (
    VirtIODevice,
    virtio_notify_config,
    virtio_set_features,
    virtqueue_fill,
    virtqueue_flush,
    virtqueue_pop,
    virtqueue_push,
)

pytestmark = pytest.mark.timeout(30)


def msix_device(vectors: int = 3) -> tuple[PCIDevice, list[tuple[int, int]]]:
    dev = PCIDevice("t", 3 << 3, 0x1AF4, 0x1000, 0x020000, 0x1AF4, 1, 11)
    dev.msix_init(vectors, 1)
    sent: list[tuple[int, int]] = []
    dev.msi_send = lambda address, data: sent.append((address, data))
    dev.pci_default_write_config(dev.msix_cap + 2, PCI_MSIX_FLAGS_ENABLE, 2)
    for v in range(vectors):
        dev.msix_table_mmio_write(None, v * 16, 0xFEE00000, 4)
        dev.msix_table_mmio_write(None, v * 16 + 8, 0x20 + v, 4)
        dev.msix_table_mmio_write(None, v * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL, 0, 4)
    return dev, sent


def test_msix_notify_sends_only_for_a_vector_in_use() -> None:
    dev, sent = msix_device()
    dev.msix_notify(1)
    assert sent == []
    assert dev.msix_vector_use(1) == 0 and dev.msix_vector_use(3) == -22
    dev.msix_notify(1)
    assert sent == [(0xFEE00000, 0x21)]
    dev.msix_table_mmio_write(None, 16 + PCI_MSIX_ENTRY_VECTOR_CTRL,
                              PCI_MSIX_ENTRY_CTRL_MASKBIT, 4)
    dev.msix_notify(1)
    assert dev.msix_is_pending(1) and len(sent) == 1
    dev.msix_vector_unuse(1)  # the last user gone: nothing stays pending
    assert not dev.msix_is_pending(1)


def test_vector_notifiers_hear_mask_changes_not_table_writes() -> None:
    dev, _ = msix_device()
    heard: list[tuple[str, int, object]] = []
    dev.msix_vector_use_notifier = lambda v, msg: heard.append(("unmask", v, msg))
    dev.msix_vector_release_notifier = lambda v: heard.append(("mask", v, None))
    dev.msix_table_mmio_write(None, 2 * 16 + 8, 0x44, 4)  # unmasked: data written, no event
    assert heard == []
    ctrl = 2 * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL
    dev.msix_table_mmio_write(None, ctrl, PCI_MSIX_ENTRY_CTRL_MASKBIT, 4)
    dev.msix_table_mmio_write(None, 2 * 16 + 8, 0x45, 4)
    dev.msix_table_mmio_write(None, ctrl, 0, 4)
    assert heard == [("mask", 2, None), ("unmask", 2, (0xFEE00000, 0x45))]


def test_intx_disable_keeps_the_pin_off_the_bus() -> None:
    dev = PCIDevice("t", 3 << 3, 0x1AF4, 0x1000, 0x020000, 0x1AF4, 1, 11)
    lines: list[tuple[int, int]] = []
    dev.intx_set_irq = lambda gsi, level: lines.append((gsi, level))
    dev.pci_default_write_config(PCI_COMMAND, PCI_COMMAND_INTX_DISABLE | 0x7, 2)
    dev.pci_set_irq(1)
    assert lines == [] and dev.config[PCI_STATUS] & PCI_STATUS_INTERRUPT
    dev.pci_default_write_config(PCI_COMMAND, 0x7, 2)
    assert lines == [(11, 1)]
    dev.pci_default_write_config(PCI_COMMAND, PCI_COMMAND_INTX_DISABLE | 0x7, 2)
    assert lines == [(11, 1), (11, 0)]
    dev.pci_set_irq(0)
    assert lines == [(11, 1), (11, 0)] and not dev.config[PCI_STATUS] & PCI_STATUS_INTERRUPT


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with guest_memory() as m:
        yield m


def test_features_are_refused_after_features_ok_only(mem: GuestMemory) -> None:
    vdev = VirtIODevice("virtio-net", VIRTIO_ID_NET, 0, mem)
    vdev.host_features = 1 << VIRTIO_RING_F_EVENT_IDX
    vdev.status = VIRTIO_CONFIG_S_DRIVER_OK  # a legacy driver never sets FEATURES_OK
    assert virtio_set_features(vdev, 1 << VIRTIO_RING_F_EVENT_IDX) == 0
    assert vdev.guest_features == 1 << VIRTIO_RING_F_EVENT_IDX
    vdev.status = VIRTIO_CONFIG_S_FEATURES_OK
    assert virtio_set_features(vdev, 0) == -22
    assert vdev.guest_features == 1 << VIRTIO_RING_F_EVENT_IDX


def test_a_config_change_is_a_new_generation(mem: GuestMemory) -> None:
    vdev = VirtIODevice("virtio-net", VIRTIO_ID_NET, 0, mem)
    vectors: list[int] = []
    vdev.notify_vector = vectors.append
    virtio_notify_config(vdev)
    assert vdev.generation == 0 and vectors == []  # before DRIVER_OK: nothing
    vdev.status = VIRTIO_CONFIG_S_DRIVER_OK
    virtio_notify_config(vdev)
    virtio_notify_config(vdev)
    assert vdev.generation == 2 and len(vectors) == 2 and vdev.isr == 3


@pytest.mark.parametrize("push", ["one step", "fill and flush"])
def test_the_packed_used_wrap_forgets_the_signalled_position(mem: GuestMemory,
                                                             push: str) -> None:
    num = 4
    ring = MockPackedQueue(mem, num)
    vdev, vq = make_packed_device(mem, num, ring.layout, event_idx=True)
    try:
        for i in range(num):
            ring.offer([(ring.alloc(16), 16, 0)], buf_id=i)
        for i in range(num):
            elem = virtqueue_pop(vq)
            assert elem is not None
            vq.signalled_used_valid = True
            if push == "one step":
                virtqueue_push(vq, elem, 0)
            else:
                virtqueue_fill(vq, elem, 0, 0)
                virtqueue_flush(vq, 1)
            assert vq.signalled_used_valid == (i < num - 1), i
        assert vq.used_idx == 0 and vq.used_wrap_counter is False
    finally:
        release_packed_device(vq)
        ring.release()
