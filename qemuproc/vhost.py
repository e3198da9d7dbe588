"""Stands for hw/virtio/vhost.c: QEMU's side of a vhost device.

Every step goes through the back end's ``VhostOps`` (qemuproc/vhost_backend.py: the kernel's
ioctls; qemuproc/vhost_user.py: vhost-user messages). ``vhost_dev_init`` takes ownership
(SET_OWNER, GET_FEATURES, the busy-poll timeout and, ``vhost_virtqueue_init``, the error
eventfd of each queue: a ring error the back end finds is reported by
``vhost_virtqueue_error_notifier`` in QEMU's main loop); ``vhost_dev_start`` gives the back
end the features, the memory table and each ring (``vhost_virtqueue_start``:
SET_VRING_NUM/BASE/ADDR/KICK/CALL); ``vhost_dev_stop`` takes the rings' state back
(GET_VRING_BASE), so that the userspace device carries on where vhost stopped.
``vhost_dev_enable_notifiers`` grabs the host notifiers (QEMU stops polling every one of its
ioeventfds) and hands this device's queues' to the back end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.eventfd import EventfdNotifier, poll_bridge
from common.notifier import EventNotifier, PollBridge
from common.trace import traced
from qemuproc.main_loop import MainLoop
from qemuproc.vhost_backend import VhostOps, kernel_ops
from qemuproc.virtio import (
    VirtIODevice,
    virtio_error,
    virtio_queue_get_last_avail_idx,
    virtio_queue_restore_last_avail_idx,
    virtio_queue_set_last_avail_idx,
)
from qemuproc.virtio_bus import (
    virtio_bus_grab_ioeventfd,
    virtio_bus_release_ioeventfd,
    virtio_bus_set_host_notifier,
)

EINVAL = 22


class VhostDev:
    """struct vhost_dev: ``nvqs`` queues of ``vdev`` from ``vq_index`` on, and the backend."""

    def __init__(self, backend: Any, nvqs: int, busyloop_timeout: int,
                 vq_index: int = 0, main_loop: MainLoop | None = None,
                 error_notifier_name: Callable[[int], str] | None = None,
                 vhost_ops: VhostOps = kernel_ops) -> None:
        self.backend = backend  # the ops' opaque: VhostKernel or VhostUser
        self.vhost_ops = vhost_ops
        self.nvqs = nvqs
        self.vq_index = vq_index
        self.main_loop = main_loop
        self.error_notifier_name = error_notifier_name
        self.error_notifiers: list[Any] = []
        self.vring_errors = 0
        self.vdev: VirtIODevice | None = None  # set while started
        self.busyloop_timeout = busyloop_timeout
        self.features = 0
        self.acked_features = 0
        self.started = False
        self.starts = 0
        self.stops = 0
        self.ring_bases: dict[int, int] = {}  # what VHOST_GET_VRING_BASE gave at the last stop
        self.max_queues = 1
        self.protocol_features = 0
        self.backend_features = 0
        self.userspace_base = 0  # QEMU's address of guest RAM (0: the kernel's GPA == QVA)


@traced
def vhost_dev_init(hdev: VhostDev) -> None:
    ops = hdev.vhost_ops
    ops.vhost_backend_init(hdev)
    ops.vhost_set_owner(hdev)
    hdev.features = ops.vhost_get_features(hdev)
    for i in range(hdev.nvqs):
        vhost_virtqueue_init(hdev, i)
        if ops.vhost_set_vring_busyloop_timeout is not None:
            ops.vhost_set_vring_busyloop_timeout(hdev, i, hdev.busyloop_timeout)


def vhost_virtqueue_init(hdev: VhostDev, n: int) -> None:
    """The queue's error eventfd goes to the back end (VHOST_SET_VRING_ERR); QEMU's main loop
    reads it. A vhost-user back end gets a real eventfd; the kernel a named semaphore."""
    if hdev.main_loop is None:
        return
    if hdev.vhost_ops.backend_type == "user":
        bridge: Any = poll_bridge(EventfdNotifier())
    elif hdev.error_notifier_name is None:
        return
    else:
        bridge = PollBridge(EventNotifier(hdev.error_notifier_name(hdev.vq_index + n)))
    hdev.error_notifiers.append(bridge)
    ops = hdev.vhost_ops
    ops.vhost_set_vring_err(hdev, ops.vhost_get_vq_index(hdev, hdev.vq_index + n), bridge.notifier)
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
    """The ring's size, position and addresses (QEMU's own mapping of them: vhost_memory_map),
    the kick (the queue's host notifier, KVM's ioeventfd) and the call (vhost_virtqueue_mask
    unmasked: the guest notifier)."""
    vq = vdev.vq[idx]
    ops = hdev.vhost_ops
    i = ops.vhost_get_vq_index(hdev, idx)
    base = hdev.userspace_base
    ops.vhost_set_vring_num(hdev, i, vq.num)
    ops.vhost_set_vring_base(hdev, i, virtio_queue_get_last_avail_idx(vq))
    ops.vhost_set_vring_addr(hdev, i, base + vq.desc, base + vq.avail, base + vq.used)
    ops.vhost_set_vring_kick(hdev, i, bus.vhost_host_notifier(idx))
    ops.vhost_set_vring_call(hdev, i, bus.vhost_guest_notifier(idx))


@traced
def vhost_dev_start(hdev: VhostDev, vdev: VirtIODevice, bus: Any) -> None:
    ops = hdev.vhost_ops
    ops.vhost_set_features(hdev, hdev.acked_features)
    ops.vhost_set_mem_table(hdev, vdev)
    hdev.vdev = vdev
    for i in range(hdev.nvqs):
        vhost_virtqueue_start(hdev, vdev, bus, hdev.vq_index + i)
    hdev.started = True
    hdev.starts += 1


@traced
def vhost_virtqueue_stop(hdev: VhostDev, vdev: VirtIODevice, idx: int) -> None:
    """Where the back end got to: QEMU's queue continues from there. A back end that cannot
    say (the vhost-user connection is gone) leaves the queue at the used index
    (virtio_queue_restore_last_avail_idx)."""
    ops = hdev.vhost_ops
    vq = vdev.vq[idx]
    try:
        base = ops.vhost_get_vring_base(hdev, ops.vhost_get_vq_index(hdev, idx))
    except OSError:
        if ops.backend_type != "user":
            raise
        virtio_queue_restore_last_avail_idx(vq)
    else:
        hdev.ring_bases[idx] = base
        virtio_queue_set_last_avail_idx(vq, base)
    if vq.views is not None and not vq.packed:  # virtio_queue_update_used_idx
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


def vhost_dev_cleanup(hdev: VhostDev) -> None:
    """The device goes: its error notifiers, then the back end's own state."""
    for bridge in hdev.error_notifiers:
        if hdev.main_loop is not None:
            hdev.main_loop.qemu_set_fd_handler(bridge.fileno(), None, None, None)
        bridge.stop()
    hdev.error_notifiers.clear()
    hdev.vhost_ops.vhost_backend_cleanup(hdev)
