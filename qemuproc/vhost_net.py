"""Stands for hw/net/vhost_net.c: vhost-net for a tap netdev (``-netdev tap,vhost=on``).

``vhost_net_init`` opens /dev/vhost-net for the tap and sets it up (vhost_dev_init).
``vhost_net_start`` (the driver set DRIVER_OK) routes the interrupts to irqfds, hands the
queues' ioeventfds and rings to the kernel and gives it the tap
(VHOST_NET_SET_BACKEND): from then on QEMU neither polls the tap nor runs the queues.
``vhost_net_stop`` undoes it, takes the rings' state back and releases the guest
notifiers, and QEMU's userspace virtio-net carries on; a device reset reaches it through
``virtio_reset`` (status 0 -> virtio_net_set_status).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.trace import traced
from common.vhost_abi import VHOST_NET_SET_BACKEND
from common.virtio_abi import (
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from qemuproc.main_loop import MainLoop
from qemuproc.net import NetClientState
from qemuproc.vhost import (
    VhostDev,
    vhost_dev_disable_notifiers,
    vhost_dev_enable_notifiers,
    vhost_dev_init,
    vhost_dev_start,
    vhost_dev_stop,
    vhost_get_features,
)
from qemuproc.vhost_backend import VhostKernel
from qemuproc.virtio import VirtIODevice

kernel_feature_bits = [VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_RING_F_INDIRECT_DESC,
                       VIRTIO_RING_F_EVENT_IDX, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_F_VERSION_1,
                       VIRTIO_F_RING_PACKED]
"""The features vhost-net must implement itself (those of QEMU 7.2's list the replica
models): one the kernel does not offer, as the packed ring, is taken from the device; the
rest (checksums, ANY_LAYOUT, whose bit is VHOST_NET_F_VIRTIO_NET_HDR's) the tap does or the
kernel need not know."""
VHOST_NET_VQS = 2


class VHostNetState:
    """struct vhost_net: the vhost device of one queue pair and its tap."""

    def __init__(self, nc: NetClientState, backend_fd: int, dev: VhostDev) -> None:
        self.nc = nc
        self.backend = backend_fd
        self.dev = dev


@traced
def vhost_net_init(nc: NetClientState, backend_fd: int, rundir: str, busyloop_timeout: int,
                   main_loop: MainLoop | None = None,
                   error_notifier_name: Callable[[int], str] | None = None) -> VHostNetState:
    """Open /dev/vhost-net for the tap ``backend_fd`` of queue pair ``nc.queue_index``
    (net_init_tap's vhost=on)."""
    dev = VhostDev(VhostKernel(rundir), VHOST_NET_VQS, busyloop_timeout,
                   nc.queue_index * VHOST_NET_VQS, main_loop, error_notifier_name)
    vhost_dev_init(dev)
    return VHostNetState(nc, backend_fd, dev)


def vhost_net_get_features(net: VHostNetState, features: int) -> int:
    return vhost_get_features(net.dev, kernel_feature_bits, features)


def vhost_net_ack_features(net: VHostNetState, features: int) -> None:
    acked = 0
    for bit in kernel_feature_bits:
        acked |= features & (1 << bit)
    net.dev.acked_features = acked


def vhost_net_set_backend(net: VHostNetState, index: int, fd: int) -> None:
    net.dev.backend.vhost_kernel_call(VHOST_NET_SET_BACKEND, index, fd=fd if fd >= 0 else None)


@traced
def vhost_net_start_one(net: VHostNetState, vdev: VirtIODevice, bus: Any) -> None:
    vhost_dev_enable_notifiers(net.dev, vdev, bus)
    vhost_dev_start(net.dev, vdev, bus)
    net.nc.info.poll(net.nc, False)  # tap_poll: QEMU stops reading and writing the tap
    for index in range(net.dev.nvqs):
        vhost_net_set_backend(net, index, net.backend)


@traced
def vhost_net_stop_one(net: VHostNetState, vdev: VirtIODevice, bus: Any) -> None:
    for index in range(net.dev.nvqs):
        vhost_net_set_backend(net, index, -1)
    net.nc.info.poll(net.nc, True)
    vhost_dev_stop(net.dev, vdev)
    vhost_dev_disable_notifiers(net.dev, vdev, bus)


@traced
def vhost_net_start(vdev: VirtIODevice, ncs: list[NetClientState], queue_pairs: int,
                    bus: Any) -> None:
    """The guest is ready: interrupts to irqfds (set_guest_notifiers), then each pair's
    vhost device takes its rings and the tap."""
    for i in range(queue_pairs):
        get_vhost_net(ncs[i].peer).dev.vq_index = 2 * i  # vhost_net_set_vq_index
    bus.virtio_pci_set_guest_notifiers(True)
    for i in range(queue_pairs):
        vhost_net_start_one(get_vhost_net(ncs[i].peer), vdev, bus)


@traced
def vhost_net_stop(vdev: VirtIODevice, ncs: list[NetClientState], queue_pairs: int,
                   bus: Any) -> None:
    """Each pair's vhost device gives its rings back, then the interrupts leave the irqfds
    (set_guest_notifiers): QEMU's own device raises them again."""
    for i in range(queue_pairs):
        vhost_net_stop_one(get_vhost_net(ncs[i].peer), vdev, bus)
    bus.virtio_pci_set_guest_notifiers(False)


def get_vhost_net(nc: NetClientState | None) -> VHostNetState | None:
    if nc is None or nc.info.type != "tap":
        return None
    return nc.opaque.vhost_net


def vhost_net_cleanup(net: VHostNetState) -> None:
    net.dev.backend.close()
