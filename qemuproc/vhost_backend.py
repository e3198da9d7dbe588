"""Stands for hw/virtio/vhost-backend.c: the kernel vhost backend, ioctls on /dev/vhost-net.

Making a ``VhostKernel`` is net/tap.c's ``open("/dev/vhost-net")`` in
``net_init_tap_one`` (it connects to the KVM process's node, see common/vhost_abi.py);
``vhost_kernel_call`` is one ioctl: the request goes out, with an fd argument as
SCM_RIGHTS, and the call returns the kernel's answer (negative: -errno).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from common.kvm_abi import packb, unpackb
from common.vhost_abi import VHOST_DEVICE, VHOST_MSG_MAX

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
