"""Stands for hw/virtio/vhost-backend.c and include/hw/virtio/vhost-backend.h: ``VhostOps``,
the table of operations a vhost back end gives ``struct vhost_dev`` (hw/virtio/vhost.c drives
either table the same way), and the kernel's table, ioctls on /dev/vhost-net.

Making a ``VhostKernel`` is net/tap.c's ``open("/dev/vhost-net")`` in
``net_init_tap_one`` (it connects to the KVM process's node, see common/vhost_abi.py);
``vhost_kernel_call`` is one ioctl: the request goes out, with an fd argument as
SCM_RIGHTS, and the call returns the kernel's answer (negative: -errno). The vhost-user
table is hw/virtio/vhost-user.c's (qemuproc/vhost_user.py).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.kvm_abi import packb, unpackb
from common.vhost_abi import (
    VHOST_DEVICE,
    VHOST_GET_FEATURES,
    VHOST_GET_VRING_BASE,
    VHOST_MSG_MAX,
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

OPEN_WAIT_S = 5.0
"""The KVM process makes its device node as it starts; QEMU may start first."""


class VhostError(OSError):
    pass


class VhostKernel:
    """An open /dev/vhost-net: one vhost-net device in the kernel."""

    def __init__(self, rundir: str | Path) -> None:
        path = str(Path(rundir) / VHOST_DEVICE)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise VhostError(f"cannot open {VHOST_DEVICE}: no such device") from None
                time.sleep(0.01)
        self.calls = 0

    def vhost_kernel_call(self, request: str, *args: Any, fd: int | None = None) -> Any:
        """ioctl(vhostfd, request, arg): the payload, or VhostError(-ret)."""
        msg = packb([request, *args])
        if fd is not None and fd >= 0:
            self.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       fd.to_bytes(4, "little", signed=True))])
        else:
            self.sock.send(msg)
        data = self.sock.recv(VHOST_MSG_MAX)
        if not data:
            raise VhostError(f"{request}: the vhost device went away")
        self.calls += 1
        ret, payload = unpackb(data)
        if ret < 0:
            raise VhostError(-ret, f"{request}: {os.strerror(-ret)}"
                             + (f" ({payload})" if payload else ""))
        return payload

    def close(self) -> None:
        self.sock.close()


Op = Callable[..., Any]


@dataclass(frozen=True)
class VhostOps:
    """struct VhostOps: each takes the ``vhost_dev`` first; None where a back end has none.

    Kick, call and error "files" are notifiers: the kernel's take their names (named
    semaphores inside the replica), vhost-user's their fds."""

    backend_type: str
    vhost_backend_init: Op
    vhost_backend_cleanup: Op
    vhost_set_owner: Op
    vhost_get_features: Op
    vhost_set_features: Op
    vhost_set_mem_table: Op
    vhost_set_vring_num: Op
    vhost_set_vring_addr: Op
    vhost_set_vring_base: Op
    vhost_get_vring_base: Op
    vhost_set_vring_kick: Op
    vhost_set_vring_call: Op
    vhost_set_vring_err: Op
    vhost_get_vq_index: Op
    vhost_set_vring_busyloop_timeout: Op | None = None
    vhost_set_vring_enable: Op | None = None
    vhost_net_set_backend: Op | None = None
    vhost_get_inflight_fd: Op | None = None
    vhost_set_inflight_fd: Op | None = None


def vhost_kernel_init(dev: Any) -> None:
    """The device was opened when the ``VhostKernel`` was made."""


def vhost_kernel_cleanup(dev: Any) -> None:
    dev.backend.close()


def _call(dev: Any, request: str, *args: Any, fd: int | None = None) -> Any:
    return dev.backend.vhost_kernel_call(request, *args, fd=fd)


def _file(f: Any) -> str | None:
    return f if f is None or isinstance(f, str) else f.name


kernel_ops = VhostOps(
    backend_type="kernel",
    vhost_backend_init=vhost_kernel_init,
    vhost_backend_cleanup=vhost_kernel_cleanup,
    vhost_set_owner=lambda dev: _call(dev, VHOST_SET_OWNER),
    vhost_get_features=lambda dev: _call(dev, VHOST_GET_FEATURES),
    vhost_set_features=lambda dev, features: _call(dev, VHOST_SET_FEATURES, features),
    vhost_set_mem_table=lambda dev, vdev: _call(dev, VHOST_SET_MEM_TABLE, [
        {"guest_phys_addr": 0, "memory_size": vdev.dma.size, "userspace_addr": 0,
         "shm": vdev.dma.name}]),
    vhost_set_vring_num=lambda dev, i, num: _call(dev, VHOST_SET_VRING_NUM, i, num),
    vhost_set_vring_addr=lambda dev, i, desc, avail, used: _call(
        dev, VHOST_SET_VRING_ADDR, i, desc, avail, used, 0),
    vhost_set_vring_base=lambda dev, i, num: _call(dev, VHOST_SET_VRING_BASE, i, num),
    vhost_get_vring_base=lambda dev, i: _call(dev, VHOST_GET_VRING_BASE, i),
    vhost_set_vring_kick=lambda dev, i, f: _call(dev, VHOST_SET_VRING_KICK, i, _file(f)),
    vhost_set_vring_call=lambda dev, i, f: _call(dev, VHOST_SET_VRING_CALL, i, _file(f)),
    vhost_set_vring_err=lambda dev, i, f: _call(dev, VHOST_SET_VRING_ERR, i, _file(f)),
    vhost_get_vq_index=lambda dev, idx: idx - dev.vq_index,
    vhost_set_vring_busyloop_timeout=lambda dev, i, t: _call(
        dev, VHOST_SET_VRING_BUSYLOOP_TIMEOUT, i, t),
)
"""vhost-backend.c's ``kernel_ops``."""
