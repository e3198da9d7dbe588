"""Stands for hw/net/vhost_net.c: vhost-net for a tap netdev (``-netdev tap,vhost=on``) and
for ``-netdev vhost-user`` (the same vhost_dev over hw/virtio/vhost-user.c's ops).

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
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GSO,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from qemuproc.main_loop import MainLoop
from qemuproc.net import NetClientState
from qemuproc.vhost import (
    VhostDev,
    vhost_dev_cleanup,
    vhost_dev_disable_notifiers,
    vhost_dev_enable_notifiers,
    vhost_dev_init,
    vhost_dev_start,
    vhost_dev_stop,
    vhost_get_features,
)
from qemuproc.vhost_backend import VhostKernel
from qemuproc.vhost_user import VhostUser, VhostUserState, user_ops
from qemuproc.virtio import VirtIODevice

kernel_feature_bits = [VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_RING_F_INDIRECT_DESC,
                       VIRTIO_RING_F_EVENT_IDX, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_F_VERSION_1,
                       VIRTIO_F_RING_PACKED]
"""The features vhost-net must implement itself (those of QEMU 7.2's list the replica
models): one the kernel does not offer, as the packed ring, is taken from the device; the
rest (checksums, ANY_LAYOUT, whose bit is VHOST_NET_F_VIRTIO_NET_HDR's) the tap does or the
kernel need not know."""
user_feature_bits = [VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_RING_F_INDIRECT_DESC,
                     VIRTIO_RING_F_EVENT_IDX, VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1,
                     VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GSO,
                     VIRTIO_NET_F_MRG_RXBUF, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED,
                     VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MQ]
"""What a vhost-user back end must offer for the device to keep it (QEMU 7.2's list, less
the offloads the replica's device never offers)."""
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
                   error_notifier_name: Callable[[int], str] | None = None,
                   opaque: VhostUserState | None = None) -> VHostNetState:
    """Open /dev/vhost-net for the tap ``backend_fd`` of queue pair ``nc.queue_index``
    (net_init_tap's vhost=on), or, given a VhostUserState, set up the vhost-user back end's
    queue pair (vhost_user_start)."""
    if opaque is not None:
        dev = VhostDev(VhostUser(opaque), VHOST_NET_VQS, 0, nc.queue_index * VHOST_NET_VQS,
                       main_loop, vhost_ops=user_ops)
    else:
        dev = VhostDev(VhostKernel(rundir), VHOST_NET_VQS, busyloop_timeout,
                       nc.queue_index * VHOST_NET_VQS, main_loop, error_notifier_name)
    try:
        vhost_dev_init(dev)
    except OSError:
        vhost_dev_cleanup(dev)
        raise
    return VHostNetState(nc, backend_fd, dev)


def vhost_net_get_feature_bits(net: VHostNetState) -> list[int]:
    return user_feature_bits if net.nc.info.type == "vhost-user" else kernel_feature_bits


def vhost_net_get_max_queues(net: VHostNetState) -> int:
    return net.dev.max_queues


def vhost_net_get_features(net: VHostNetState, features: int) -> int:
    return vhost_get_features(net.dev, vhost_net_get_feature_bits(net), features)


def vhost_net_ack_features(net: VHostNetState, features: int) -> None:
    acked = net.dev.backend_features
    for bit in vhost_net_get_feature_bits(net):
        acked |= features & (1 << bit)
    net.dev.acked_features = acked


def vhost_net_set_backend(net: VHostNetState, index: int, fd: int) -> None:
    net.dev.backend.vhost_kernel_call(VHOST_NET_SET_BACKEND, index, fd=fd if fd >= 0 else None)


def vhost_set_vring_enable(nc: NetClientState, enable: bool) -> int:
    """Queue pair ``nc`` on or off in the back end (vhost-user's SET_VRING_ENABLE); kept in
    ``nc.vring_enable`` so that a back end that reconnects gets it again. A back end that is
    gone makes it return -errno, as vhost_user_write's failure does in QEMU."""
    net = get_vhost_net(nc)
    nc.vring_enable = enable
    if net is not None and net.dev.vhost_ops.vhost_set_vring_enable is not None:
        try:
            net.dev.vhost_ops.vhost_set_vring_enable(net.dev, enable)
        except OSError as e:
            return -(e.errno or 5)
    return 0


@traced
def vhost_net_start_one(net: VHostNetState, vdev: VirtIODevice, bus: Any) -> None:
    vhost_dev_enable_notifiers(net.dev, vdev, bus)
    vhost_dev_start(net.dev, vdev, bus)
    if net.nc.info.poll is not None:
        net.nc.info.poll(net.nc, False)  # tap_poll: QEMU stops reading and writing the tap
    if net.nc.info.type == "tap":
        for index in range(net.dev.nvqs):
            vhost_net_set_backend(net, index, net.backend)


@traced
def vhost_net_stop_one(net: VHostNetState, vdev: VirtIODevice, bus: Any) -> None:
    if net.nc.info.type == "tap":
        for index in range(net.dev.nvqs):
            vhost_net_set_backend(net, index, -1)
    if net.nc.info.poll is not None:
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
        peer = ncs[i].peer
        if peer.vring_enable:  # restore the enable state the back end may have lost
            vhost_set_vring_enable(peer, peer.vring_enable)


@traced
def vhost_net_stop(vdev: VirtIODevice, ncs: list[NetClientState], queue_pairs: int,
                   bus: Any) -> None:
    """Each pair's vhost device gives its rings back, then the interrupts leave the irqfds
    (set_guest_notifiers): QEMU's own device raises them again."""
    for i in range(queue_pairs):
        vhost_net_stop_one(get_vhost_net(ncs[i].peer), vdev, bus)
    bus.virtio_pci_set_guest_notifiers(False)


def get_vhost_net(nc: NetClientState | None) -> VHostNetState | None:
    if nc is None or nc.info.type not in ("tap", "vhost-user"):
        return None
    return nc.opaque.vhost_net


def vhost_net_cleanup(net: VHostNetState) -> None:
    vhost_dev_cleanup(net.dev)
