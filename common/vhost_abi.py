"""Stands for include/uapi/linux/vhost.h: the vhost ioctls QEMU issues on /dev/vhost-net.

Here /dev/vhost-net is a Unix seqpacket socket the KVM process listens on (``vhost-net`` in
the run directory, mode 0600): opening the device is connecting to it, each ioctl is one
msgpack record ``[request, *args]`` answered by ``[ret, payload]``, and an ioctl's file
descriptor argument (VHOST_NET_SET_BACKEND's tap) travels with it as SCM_RIGHTS. The kick and
call eventfds are named by their semaphores, as KVM_IOEVENTFD and KVM_IRQFD name them.
"""

from __future__ import annotations

VHOST_GET_FEATURES = "VHOST_GET_FEATURES"
VHOST_SET_FEATURES = "VHOST_SET_FEATURES"
VHOST_SET_OWNER = "VHOST_SET_OWNER"
VHOST_RESET_OWNER = "VHOST_RESET_OWNER"
VHOST_SET_MEM_TABLE = "VHOST_SET_MEM_TABLE"
VHOST_SET_VRING_NUM = "VHOST_SET_VRING_NUM"
VHOST_SET_VRING_ADDR = "VHOST_SET_VRING_ADDR"
VHOST_SET_VRING_BASE = "VHOST_SET_VRING_BASE"
VHOST_GET_VRING_BASE = "VHOST_GET_VRING_BASE"
VHOST_SET_VRING_KICK = "VHOST_SET_VRING_KICK"
VHOST_SET_VRING_CALL = "VHOST_SET_VRING_CALL"
VHOST_SET_VRING_ERR = "VHOST_SET_VRING_ERR"
VHOST_SET_VRING_BUSYLOOP_TIMEOUT = "VHOST_SET_VRING_BUSYLOOP_TIMEOUT"
VHOST_NET_SET_BACKEND = "VHOST_NET_SET_BACKEND"
VHOST_GET_STATS = "VHOST_GET_STATS"
"""Not an ioctl: what ``info vhost`` shows (the worker's counters), read over the same file."""

VHOST_NET_F_VIRTIO_NET_HDR = 27
VHOST_DEVICE = "vhost-net"
"""The device node's name in the run directory."""
VHOST_MSG_MAX = 65536
