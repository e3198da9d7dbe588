"""Stands for hw/virtio/vhost.c: QEMU's side of a vhost device.

``vhost_dev_init`` takes ownership (VHOST_SET_OWNER, VHOST_GET_FEATURES, the busy-poll
timeout and, ``vhost_virtqueue_init``, the error eventfd of each queue: a ring error the
kernel finds is reported by ``vhost_virtqueue_error_notifier`` in QEMU's main loop);
``vhost_dev_start`` gives the kernel the features, the memory table and each ring
(``vhost_virtqueue_start``: VHOST_SET_VRING_NUM/BASE/ADDR/KICK/CALL); ``vhost_dev_stop``
takes the rings' state back (VHOST_GET_VRING_BASE), so that the userspace device carries on
where vhost stopped. ``vhost_dev_enable_notifiers`` grabs the host notifiers (QEMU stops
polling every one of its ioeventfds) and hands this device's queues' to the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.notifier import EventNotifier, PollBridge
from common.trace import traced
from common.vhost_abi import (
    VHOST_GET_FEATURES,
    VHOST_GET_VRING_BASE,
    VHOST_SET_FEATURES,
    VHOST_SET_MEM_TABLE,
    VHOST_SET_OWNER,
    VHOST_SET_VRING_ADDR,
    VHOST_SET_VRING_BASE,
    VHOST_SET_VRING_BUSYLOOP_TIMEOUT,
    VHOST_SET_VRING_CALL,
    VHOST_SET_VRING_ERR,
    VHOST_SET_VRING_KICK,
    VHOST_SET_VRING_NUM,
)
from qemuproc.main_loop import MainLoop
from qemuproc.vhost_backend import VhostKernel
from qemuproc.virtio import VirtIODevice, virtio_error
from qemuproc.virtio_bus import (
    virtio_bus_grab_ioeventfd,
    virtio_bus_release_ioeventfd,
    virtio_bus_set_host_notifier,
)

EINVAL = 22


class VhostDev:
    """struct vhost_dev: ``nvqs`` queues of ``vdev`` from ``vq_index`` on, and the backend."""

    def __init__(self, backend: VhostKernel, nvqs: int, busyloop_timeout: int,
                 vq_index: int = 0, main_loop: MainLoop | None = None,
                 error_notifier_name: Callable[[int], str] | None = None) -> None:
        self.backend = backend
        self.nvqs = nvqs
        self.vq_index = vq_index
        self.main_loop = main_loop
        self.error_notifier_name = error_notifier_name
        self.error_notifiers: list[PollBridge] = []
        self.vring_errors = 0
        self.vdev: VirtIODevice | None = None  # set while started
        self.busyloop_timeout = busyloop_timeout
        self.features = 0
        self.acked_features = 0
        self.started = False
        self.starts = 0
        self.stops = 0
        self.ring_bases: dict[int, int] = {}  # what VHOST_GET_VRING_BASE gave at the last stop


@traced
def vhost_dev_init(hdev: VhostDev) -> None:
    call = hdev.backend.vhost_kernel_call
    call(VHOST_SET_OWNER)
    hdev.features = call(VHOST_GET_FEATURES)
    for i in range(hdev.nvqs):
        vhost_virtqueue_init(hdev, i)
        call(VHOST_SET_VRING_BUSYLOOP_TIMEOUT, i, hdev.busyloop_timeout)


def vhost_virtqueue_init(hdev: VhostDev, n: int) -> None:
    """The queue's error eventfd goes to the kernel (VHOST_SET_VRING_ERR); QEMU's main loop
    reads it."""
    if hdev.error_notifier_name is None or hdev.main_loop is None:
        return
    bridge = PollBridge(EventNotifier(hdev.error_notifier_name(hdev.vq_index + n)))
    hdev.error_notifiers.append(bridge)
    hdev.backend.vhost_kernel_call(VHOST_SET_VRING_ERR, n, bridge.notifier.name)
    hdev.main_loop.qemu_set_fd_handler(bridge.fileno(), vhost_virtqueue_error_notifier, None,
                                       (hdev, n), f"vhost-vring-err:{hdev.vq_index + n}")


def vhost_virtqueue_error_notifier(opaque: tuple[VhostDev, int]) -> None:
    """The kernel's vq_err on queue ``n``: QEMU 7.2 reports it (VHOST_OPS_DEBUG); the replica
    also marks the device broken, so that its guest resets it as for QEMU's own checks."""
    hdev, n = opaque
    if hdev.error_notifiers[n].test_and_clear() and hdev.vdev is not None:
        hdev.vring_errors += 1
        virtio_error(hdev.vdev, f"vhost vring error in virtqueue {hdev.vq_index + n}: "
                                f"Invalid argument ({EINVAL})")


def vhost_get_features(hdev: VhostDev, feature_bits: list[int], features: int) -> int:
    """Clear each of ``feature_bits`` the kernel does not have; others stay."""
    for bit in feature_bits:
        if not hdev.features >> bit & 1:
            features &= ~(1 << bit)
    return features


@traced
def vhost_dev_enable_notifiers(hdev: VhostDev, vdev: VirtIODevice, bus: Any) -> None:
    """The queues' ioeventfds go to the kernel: QEMU stops serving any of its own
    (virtio_device_grab_ioeventfd) and assigns only this device's (virtio_bus_set_host_notifier)."""
    virtio_bus_grab_ioeventfd(bus)
    for i in range(hdev.nvqs):
        virtio_bus_set_host_notifier(bus, hdev.vq_index + i, True)


@traced
def vhost_dev_disable_notifiers(hdev: VhostDev, vdev: VirtIODevice, bus: Any) -> None:
    """Back to QEMU (virtio_device_release_ioeventfd): once no back end holds them, its main
    loop serves the ioeventfds again."""
    for i in range(hdev.nvqs):
        virtio_bus_set_host_notifier(bus, hdev.vq_index + i, False)
    virtio_bus_release_ioeventfd(bus)


@traced
def vhost_virtqueue_start(hdev: VhostDev, vdev: VirtIODevice, bus: Any, idx: int) -> None:
    vq = vdev.vq[idx]
    call = hdev.backend.vhost_kernel_call
    i = idx - hdev.vq_index
    call(VHOST_SET_VRING_NUM, i, vq.num)
    call(VHOST_SET_VRING_BASE, i, vq.last_avail_idx)
    call(VHOST_SET_VRING_ADDR, i, vq.desc, vq.avail, vq.used, 0)
    call(VHOST_SET_VRING_KICK, i, bus.cfg.ioeventfd(idx))
    call(VHOST_SET_VRING_CALL, i, bus.queue_call_notifier_name(idx))


@traced
def vhost_dev_start(hdev: VhostDev, vdev: VirtIODevice, bus: Any) -> None:
    call = hdev.backend.vhost_kernel_call
    call(VHOST_SET_FEATURES, hdev.acked_features)
    call(VHOST_SET_MEM_TABLE, [{"guest_phys_addr": 0, "memory_size": vdev.dma.size,
                                "userspace_addr": 0, "shm": vdev.dma.name}])
    hdev.vdev = vdev
    for i in range(hdev.nvqs):
        vhost_virtqueue_start(hdev, vdev, bus, hdev.vq_index + i)
    hdev.started = True
    hdev.starts += 1


@traced
def vhost_virtqueue_stop(hdev: VhostDev, vdev: VirtIODevice, idx: int) -> None:
    """Where the kernel got to: QEMU's queue continues from there."""
    base = hdev.backend.vhost_kernel_call(VHOST_GET_VRING_BASE, idx - hdev.vq_index)
    hdev.ring_bases[idx] = base
    vq = vdev.vq[idx]
    vq.last_avail_idx = vq.shadow_avail_idx = base  # virtio_queue_set_last_avail_idx
    if vq.views is not None:  # virtio_queue_update_used_idx
        vq.used_idx = vq.views.used_hdr[1]
    vq.inuse = 0
    vq.signalled_used_valid = False


@traced
def vhost_dev_stop(hdev: VhostDev, vdev: VirtIODevice) -> None:
    for i in range(hdev.nvqs):
        vhost_virtqueue_stop(hdev, vdev, hdev.vq_index + i)
    hdev.vdev = None
    hdev.started = False
    hdev.stops += 1
