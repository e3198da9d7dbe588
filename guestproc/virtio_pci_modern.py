"""Stands for drivers/virtio/virtio_pci_modern.c: the virtio 1.0 transport's config ops.

The device's registers are the common configuration structure in the modern memory BAR
(virtio_pci_modern_dev.py); a queue's rings go wherever the driver puts them (their three
addresses are written separately, the used ring only cache-line aligned), and the queue is
enabled only once every queue is set up. A kick is ``vp_notify``'s 16-bit store to the
queue's notify address: an MMIO exit (or KVM's MMIO ioeventfd).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.trace import traced
from common.virtio_abi import (
    SMP_CACHE_BYTES,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_RING_F_EVENT_IDX,
)
from guestproc.iomap import ioread8, ioread16, ioread32, iowrite8, iowrite16, iowrite32
from guestproc.virtio import VirtioConfigOps, vring_transport_features
from guestproc.virtio_pci_legacy import (
    VirtioPciDevice,
    vp_bus_name,
    vp_del_vqs,
    vp_find_vqs,
    vp_notify,
    vp_set_vq_affinity,
    vp_synchronize_vectors,
    vp_vring_pages,
)
from guestproc.virtio_pci_modern_dev import (
    VirtioPciModernDevice,
    vp_modern_config_vector,
    vp_modern_generation,
    vp_modern_get_features,
    vp_modern_get_num_queues,
    vp_modern_get_queue_enable,
    vp_modern_get_queue_size,
    vp_modern_get_status,
    vp_modern_map_vq_notify,
    vp_modern_probe,
    vp_modern_queue_address,
    vp_modern_queue_vector,
    vp_modern_set_features,
    vp_modern_set_queue_enable,
    vp_modern_set_queue_size,
    vp_modern_set_status,
)
from guestproc.virtio_ring import (
    Virtqueue,
    virtqueue_get_avail_addr,
    virtqueue_get_desc_addr,
    virtqueue_get_used_addr,
    vring_create_virtqueue,
)


def vp_get(vdev: VirtioPciDevice, offset: int, length: int) -> bytes:
    """Read device config through the device structure: one 1-, 2- or 4-byte load, two 4-byte
    loads for 8 bytes, else byte by byte (as virtio_cread_bytes does)."""
    cpu, base = vdev.cpu, vdev.mdev.device + offset
    if length == 1:
        return bytes([ioread8(cpu, base)])
    if length == 2:
        return ioread16(cpu, base).to_bytes(2, "little")
    if length in (4, 8):
        return b"".join(ioread32(cpu, base + i).to_bytes(4, "little")
                        for i in range(0, length, 4))
    return bytes(ioread8(cpu, base + i) for i in range(length))


def vp_set(vdev: VirtioPciDevice, offset: int, buf: bytes) -> None:
    cpu, base = vdev.cpu, vdev.mdev.device + offset
    if len(buf) == 2:
        iowrite16(cpu, int.from_bytes(buf, "little"), base)
    elif len(buf) in (4, 8):
        for i in range(0, len(buf), 4):
            iowrite32(cpu, int.from_bytes(buf[i : i + 4], "little"), base + i)
    else:
        for i, b in enumerate(buf):
            iowrite8(cpu, b, base + i)


def vp_get_status(vdev: VirtioPciDevice) -> int:
    return vp_modern_get_status(vdev.mdev)


def vp_set_status(vdev: VirtioPciDevice, status: int) -> None:
    """We should never be setting status to 0 here (that is vp_reset)."""
    vp_modern_set_status(vdev.mdev, status)


def vp_reset(vdev: VirtioPciDevice) -> None:
    """0 is a reset; the driver waits for the status to read back 0 (which also flushes the
    device's writes and interrupts in flight)."""
    vp_modern_set_status(vdev.mdev, 0)
    while vp_modern_get_status(vdev.mdev):
        pass
    vp_synchronize_vectors(vdev)


def vp_get_features(vdev: VirtioPciDevice) -> int:
    return vp_modern_get_features(vdev.mdev)


def vp_finalize_features(vdev: VirtioPciDevice) -> int:
    """Keep the transport bits the ring understands; a modern device must have
    VIRTIO_F_VERSION_1 accepted, or the probe fails (-EINVAL)."""
    vring_transport_features(vdev)
    if not vdev.features >> VIRTIO_F_VERSION_1 & 1:
        raise OSError(22, "virtio: device uses modern interface but does not have "
                          "VIRTIO_F_VERSION_1")
    vp_modern_set_features(vdev.mdev, vdev.features)
    return 0


def vp_config_vector(vdev: VirtioPciDevice, vector: int) -> int:
    return vp_modern_config_vector(vdev.mdev, vector)


def vp_active_vq(vdev: VirtioPciDevice, vq: Virtqueue, msix_vec: int) -> None:
    """Tell the device the ring's size and three addresses, and the queue's vector."""
    mdev = vdev.mdev
    vp_modern_set_queue_size(mdev, vq.index, vq.num)
    vp_modern_queue_address(mdev, vq.index, virtqueue_get_desc_addr(vq),
                            virtqueue_get_avail_addr(vq), virtqueue_get_used_addr(vq))
    if msix_vec != VIRTIO_MSI_NO_VECTOR and \
            vp_modern_queue_vector(mdev, vq.index, msix_vec) == VIRTIO_MSI_NO_VECTOR:
        raise OSError(16, f"queue {vq.index}: device refused MSI-X vector {msix_vec}")


@traced
def setup_vq(vdev: VirtioPciDevice, index: int, callback: Callable[[Virtqueue], None] | None,
             name: str, msix_vec: int) -> Virtqueue:
    mdev = vdev.mdev
    if index >= vp_modern_get_num_queues(mdev):
        raise OSError(22, f"queue {index} beyond num_queues")
    num = vp_modern_get_queue_size(mdev, index)
    if not num or vp_modern_get_queue_enable(mdev, index):  # not available, or active
        raise OSError(2, f"queue {index} not available")
    if num & (num - 1):
        raise OSError(22, f"bad queue size {num}")
    base, indirect = vp_vring_pages(vdev, index, num, SMP_CACHE_BYTES)  # fits a packed ring too
    vq = vring_create_virtqueue(index, num, base, vdev.ram, vdev, vp_notify, callback, name,
                                bool(vdev.features & (1 << VIRTIO_RING_F_EVENT_IDX)),
                                align=SMP_CACHE_BYTES, indirect_base=indirect,
                                packed=bool(vdev.features & (1 << VIRTIO_F_RING_PACKED)))
    vp_active_vq(vdev, vq, msix_vec)
    vq.priv = vp_modern_map_vq_notify(mdev, index)
    if not vq.priv:
        raise OSError(12, f"queue {index}: bad notification offset")
    return vq


def del_vq(vdev: VirtioPciDevice, vq: Virtqueue) -> None:
    """Only a reset takes a modern queue back; its vector goes now."""
    if vdev.msix_enabled:
        vp_modern_queue_vector(vdev.mdev, vq.index, VIRTIO_MSI_NO_VECTOR)


@traced
def vp_modern_find_vqs(vdev: VirtioPciDevice, nvqs: int,
                       callbacks: list[Callable[[Virtqueue], None] | None],
                       names: list[str | None]) -> list[Virtqueue | None]:
    """vp_find_vqs, then enable every queue: the last step, after which only a reset goes
    back."""
    vqs = vp_find_vqs(vdev, nvqs, callbacks, names)
    for vq in vqs:
        if vq is not None:
            vp_modern_set_queue_enable(vdev.mdev, vq.index, True)
    return vqs


virtio_pci_config_ops = VirtioConfigOps(
    get=vp_get,
    set=vp_set,
    get_status=vp_get_status,
    set_status=vp_set_status,
    reset=vp_reset,
    find_vqs=vp_modern_find_vqs,
    del_vqs=vp_del_vqs,
    get_features=vp_get_features,
    finalize_features=vp_finalize_features,
    bus_name=vp_bus_name,
    set_vq_affinity=vp_set_vq_affinity,
    generation=lambda vdev: vp_modern_generation(vdev.mdev),  # vp_generation
)


def virtio_pci_modern_probe(vdev: VirtioPciDevice) -> Any:
    """The modern transport, if the function has its capabilities (else ENODEV)."""
    mdev = VirtioPciModernDevice(vdev.pci_dev)
    vp_modern_probe(mdev)
    vdev.mdev = mdev
    vdev.config = virtio_pci_config_ops
    vdev.config_vector = vp_config_vector
    vdev.setup_vq = setup_vq
    vdev.del_vq = del_vq
    vdev.isr = mdev.isr
    vdev.transport = "modern"
    return mdev
