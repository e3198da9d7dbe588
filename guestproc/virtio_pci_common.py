"""Stands for drivers/virtio/virtio_pci_common.c's probe: find the virtio-net function and
pick its transport, modern when the function offers it (a transitional device has both),
legacy otherwise, as Linux does with ``force_legacy`` off."""

from __future__ import annotations

from typing import Any

from common.trace import traced
from common.virtio_abi import (
    PCI_DEVICE_ID_VIRTIO_NET,
    PCI_DEVICE_ID_VIRTIO_NET_MODERN,
    PCI_VENDOR_ID_REDHAT_QUMRANET,
)
from guestproc.cpu import VCpu
from guestproc.kernel import Kernel
from guestproc.mm import PageAllocator
from guestproc.pci import pci_get_device
from guestproc.virtio import VirtioDriver, register_virtio_device
from guestproc.virtio_pci_legacy import VirtioPciDevice, virtio_pci_legacy_probe
from guestproc.virtio_pci_modern import virtio_pci_modern_probe


@traced
def virtio_pci_probe(cpu: VCpu, kernel: Kernel, ram: memoryview, pages: PageAllocator,
                     driver: VirtioDriver) -> Any:
    """Find the virtio-net function, choose its transport, and register it with the virtio
    core."""
    pci_dev = pci_get_device(cpu, PCI_VENDOR_ID_REDHAT_QUMRANET,
                             (PCI_DEVICE_ID_VIRTIO_NET, PCI_DEVICE_ID_VIRTIO_NET_MODERN))
    if pci_dev is None:
        raise OSError(19, "no virtio-net PCI function")
    pci_dev.pci_enable_device()
    vdev = VirtioPciDevice(pci_dev, kernel, ram, pages)
    try:
        virtio_pci_modern_probe(vdev)
    except OSError as e:
        if e.errno != 19:  # ENODEV: no modern capabilities, the legacy driver's
            raise
        virtio_pci_legacy_probe(vdev)
    pci_dev.pci_set_master()
    vdev.driver = driver
    register_virtio_device(vdev, driver)
    return vdev
