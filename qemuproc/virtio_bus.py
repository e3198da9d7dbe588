"""Stands for hw/virtio/virtio-bus.c: who serves the queues' host notifiers (ioeventfds).

The transport (virtio-pci's proxy, ``VirtioBus``) starts them at DRIVER_OK
(``virtio_bus_start_ioeventfd``) and QEMU's main loop reads them. A vhost back end grabs
them (``virtio_bus_grab_ioeventfd``, a counter): every one of QEMU's own ioeventfds stops,
and the back end assigns only its own queues' (``virtio_bus_set_host_notifier``); the
others' kicks (virtio-net's control queue) are port or MMIO exits that QEMU's vCPU thread
handles. When the last grab is released, QEMU's ioeventfds start again.
"""

from __future__ import annotations

from typing import Protocol

ENOSYS = 38


class VirtioBus(Protocol):
    """VirtioBusState with its VirtioBusClass and VirtioDeviceClass hooks, as the proxy
    provides them."""

    ioeventfd_started: bool
    ioeventfd_grabbed: int

    def ioeventfd_enabled(self) -> bool: ...

    def ioeventfd_assign(self, n: int, assign: bool) -> None: ...

    def start_ioeventfd(self) -> None: ...

    def stop_ioeventfd(self) -> None: ...


def virtio_bus_start_ioeventfd(bus: VirtioBus) -> int:
    """Start the device's ioeventfds, unless a back end holds them (then only remember that
    they are to run once it lets go)."""
    if not bus.ioeventfd_enabled():
        return -ENOSYS
    if bus.ioeventfd_started:
        return 0
    if not bus.ioeventfd_grabbed:
        bus.start_ioeventfd()
    bus.ioeventfd_started = True
    return 0


def virtio_bus_stop_ioeventfd(bus: VirtioBus) -> None:
    if not bus.ioeventfd_started:
        return
    if not bus.ioeventfd_grabbed:
        bus.stop_ioeventfd()
    bus.ioeventfd_started = False


def virtio_bus_grab_ioeventfd(bus: VirtioBus) -> int:
    """A back end takes the host notifiers: QEMU's own stop, all of them."""
    if bus.ioeventfd_grabbed == 0 and bus.ioeventfd_started:
        virtio_bus_stop_ioeventfd(bus)
        bus.ioeventfd_started = True  # to restart when the count is back to zero
    bus.ioeventfd_grabbed += 1
    return 0


def virtio_bus_release_ioeventfd(bus: VirtioBus) -> None:
    assert bus.ioeventfd_grabbed != 0
    bus.ioeventfd_grabbed -= 1
    if bus.ioeventfd_grabbed == 0 and bus.ioeventfd_started:
        bus.ioeventfd_started = False
        virtio_bus_start_ioeventfd(bus)


def virtio_bus_set_host_notifier(bus: VirtioBus, n: int, assign: bool) -> int:
    """Queue ``n``'s kick register becomes (or stops being) a KVM ioeventfd."""
    bus.ioeventfd_assign(n, assign)
    return 0
