"""Stands for drivers/vhost/net.c's misc device, ``vhost_net_misc``: /dev/vhost-net in the
KVM process.

The node is a Unix seqpacket socket in the run directory (common/vhost_abi.py); each
connection is one open file, served by a thread of its own. VHOST_SET_OWNER starts the
file's worker process ``vhost-<QEMU pid>`` (kvmproc/vhost_worker.py: ``vhost_dev_set_owner``
creating the kthread); from then on each ioctl is forwarded to it, fd arguments included,
and its answer returned. Before an owner, only the feature ioctls answer (as in Linux, the
rest say -EPERM). When the file goes, its worker releases the device and ends; if a worker
dies before that, ``on_worker_death`` hears of it.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.kvm_abi import packb, unpackb
from common.vhost_abi import (
    VHOST_DEVICE,
    VHOST_GET_FEATURES,
    VHOST_GET_STATS,
    VHOST_MSG_MAX,
    VHOST_RESET_OWNER,
    VHOST_SET_FEATURES,
    VHOST_SET_OWNER,
)
from kvmproc.vhost_net import EBUSY, EINVAL, EOPNOTSUPP, VHOST_NET_FEATURES
from kvmproc.vhost_worker import VhostWorker, VhostWorkerGone

EPERM = 1
EIO = 5


class VhostNetFile:
    """One open of /dev/vhost-net: its owner and worker process, once VHOST_SET_OWNER came."""

    def __init__(self, misc: VhostNetMisc, pid: int) -> None:
        self.misc = misc
        self.pid = pid
        self.features: int | None = None
        self.worker: VhostWorker | None = None
        self.last: dict[str, Any] = {"owner": 0, "worker": None, "worker_pid": None,
                                     "features": hex(0), "works_run": 0, "vqs": []}

    def ioctl(self, req: list, fds: list[int]) -> list:
        op = req[0] if req and isinstance(req[0], str) else None
        if op == VHOST_GET_FEATURES:
            return [0, VHOST_NET_FEATURES]
        if op == VHOST_SET_OWNER:
            return [self.vhost_dev_set_owner(), None]
        if self.worker is None:
            if op == VHOST_SET_FEATURES:
                if not isinstance(req[1], int) or req[1] & ~VHOST_NET_FEATURES:
                    return [-EOPNOTSUPP, None]
                self.features = req[1]
                return [0, None]
            if op == VHOST_RESET_OWNER:
                return [-EOPNOTSUPP, None]
            return [-EPERM, None]
        try:
            return self.worker.call(["ioctl", req], fds)
        except VhostWorkerGone:
            return [-EIO, None]

    def vhost_dev_set_owner(self) -> int:
        """The owner is the opener; its worker process starts (kthread_create ``vhost-%d``)."""
        if self.worker is not None:
            return -EBUSY
        init = {"allowed": sorted(self.misc.allowed), "ram": self.misc.ram,
                "features": self.features}
        self.worker = self.misc.take_worker()
        try:
            ret, _ = self.worker.start(self.pid, init, self.misc.worker_died)
        except VhostWorkerGone:
            return -EIO
        return ret

    def describe(self) -> dict[str, Any]:
        """The worker's counters (the last ones read, if it cannot answer now)."""
        if self.worker is not None and not self.worker.released:
            try:
                ret, d = self.worker.call(["ioctl", [VHOST_GET_STATS]])
                if ret == 0:
                    self.last = {**d, "worker_pid": self.worker.pid}
            except VhostWorkerGone:
                pass
        return self.last

    def release(self) -> dict[str, Any]:
        if self.worker is not None:
            last = self.worker.release()
            if last is not None:
                self.last = {**last, "worker_pid": self.worker.pid}
        return self.last


class VhostNetMisc:
    """The device node: a listener in the run directory; each connection is one open file,
    served by a thread that performs (forwards) its ioctls."""

    def __init__(self, rundir: str | Path, allowed: set[str], ram: str,
                 on_worker_death: Callable[[str], None]) -> None:
        self.rundir = Path(rundir)
        self.path = self.rundir / VHOST_DEVICE
        self.allowed = allowed
        self.ram = ram
        self.on_worker_death = on_worker_death
        self.files: list[VhostNetFile] = []
        self.released: list[dict] = []
        self.spare_lock = threading.Lock()
        self.spare: VhostWorker | None = None
        self.closing = False
        self._start_spare()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o077)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        self.sock.listen(4)
        self._thread = threading.Thread(target=self._accept, name="vhost-net-misc",
                                        daemon=True)
        self._thread.start()

    def worker_died(self, worker: VhostWorker, why: str) -> None:
        self.on_worker_death(why)

    def _start_spare(self) -> None:
        """Start the next worker in the background: its interpreter's start-up (half a
        second on a loaded machine) is not paid by VHOST_SET_OWNER."""
        def spawn() -> None:
            w = VhostWorker(self.rundir)
            with self.spare_lock:
                if self.spare is None and not self.closing:
                    self.spare, w = w, None
            if w is not None:
                w.discard()

        threading.Thread(target=spawn, name="vhost-spare", daemon=True).start()

    def take_worker(self) -> VhostWorker:
        with self.spare_lock:
            w, self.spare = self.spare, None
        if w is None or not w.alive():
            if w is not None:
                w.discard()
            w = VhostWorker(self.rundir)
        self._start_spare()
        return w

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, pid), name="vhost-net-file",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, pid: int) -> None:
        f = VhostNetFile(self, pid)
        self.files.append(f)
        fdsize = array.array("i").itemsize
        try:
            while True:
                try:
                    data, anc, _, _ = conn.recvmsg(VHOST_MSG_MAX, socket.CMSG_SPACE(4 * fdsize))
                except OSError:
                    break
                if not data:
                    break  # the file is closed: QEMU closed it or died
                fds: list[int] = []
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        a = array.array("i")
                        a.frombytes(payload[: len(payload) - len(payload) % fdsize])
                        fds.extend(a)
                try:
                    req = unpackb(data)
                    reply = f.ioctl(req if isinstance(req, list) else [], fds)
                except Exception as e:  # noqa: BLE001 - a bad request is an error, not a crash
                    reply = [-EINVAL, f"{type(e).__name__}: {e}"]
                for fd in fds:
                    os.close(fd)
                try:
                    conn.send(packb(reply))
                except OSError:
                    break
        finally:
            conn.close()
            last = f.release()
            self.files.remove(f)
            self.released.append(last)

    def describe(self) -> dict[str, Any]:
        return {"open": [f.describe() for f in list(self.files)], "released": self.released}

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        for f in list(self.files):
            f.release()
        with self.spare_lock:
            self.closing = True
            spare, self.spare = self.spare, None
        if spare is not None:
            spare.discard()
