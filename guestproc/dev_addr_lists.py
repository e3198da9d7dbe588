"""Stands for net/core/dev_addr_lists.c with the parts of net/core/dev.c that bring a device
up: ``dev_open`` (ndo_open, IFF_UP, ``dev_set_rx_mode``, the NETDEV_UP notifiers),
``dev_mc_add`` and ``__dev_set_rx_mode``, which hands the device's address lists and flags
to the driver (``ndo_set_rx_mode``; virtio-net turns them into control-queue commands).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

IFF_UP = 0x1
IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200
NETDEV_UP = 1



class NetDevice(Protocol):
    """What these functions use of struct net_device (guestproc.netstack.NetDevice)."""

    flags: int
    uc: dict[bytes, int]
    mc: dict[bytes, int]
    ndo_open: Callable[[NetDevice], None] | None
    ndo_set_rx_mode: Callable[[NetDevice], None] | None


NetdevNotifier = Callable[[int, NetDevice], None]
netdev_chain: list[NetdevNotifier] = []


def register_netdevice_notifier(nb: NetdevNotifier) -> None:
    netdev_chain.append(nb)


def call_netdevice_notifiers(event: int, dev: NetDevice) -> None:
    for nb in netdev_chain:
        nb(event, dev)


def __dev_set_rx_mode(dev: NetDevice) -> None:
    """Tell the driver the filter changed; nothing while the device is down."""
    if not dev.flags & IFF_UP:
        return
    if dev.ndo_set_rx_mode is not None:
        dev.ndo_set_rx_mode(dev)


dev_set_rx_mode = __dev_set_rx_mode  # (under netif_addr_lock_bh, which this kernel lacks)


def dev_open(dev: NetDevice) -> None:
    """``ip link set dev up``: open the driver, then the stack's NETDEV_UP work."""
    if dev.flags & IFF_UP:
        return
    if dev.ndo_open is not None:
        dev.ndo_open(dev)
    dev.flags |= IFF_UP
    dev_set_rx_mode(dev)
    call_netdevice_notifiers(NETDEV_UP, dev)


def dev_mc_add(dev: NetDevice, addr: bytes) -> None:
    """Add a multicast address (or a reference to one already there), then resync."""
    dev.mc[addr] = dev.mc.get(addr, 0) + 1
    __dev_set_rx_mode(dev)


def netdev_uc_count(dev: NetDevice) -> int:
    return len(dev.uc)


def netdev_mc_count(dev: NetDevice) -> int:
    return len(dev.mc)
