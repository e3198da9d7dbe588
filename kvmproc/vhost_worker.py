"""Stands for the vhost worker kthread (drivers/vhost/vhost.c's ``vhost_worker``, which
``vhost_dev_set_owner`` creates as ``vhost-<owner pid>``), as a process of its own.

In Linux the worker runs on a CPU of its own, in parallel with the vCPU; in CPython only a
process does, so the KVM process starts one per device at VHOST_SET_OWNER: a child named as
the kthread (argv[0] and PR_SET_NAME ``vhost-<QEMU pid>``) that dies with the KVM process
(PR_SET_PDEATHSIG). It maps guest RAM from the run's segment, takes the kicks on the
ioeventfds' semaphores and posts the call semaphores, which the KVM process's irqfds inject.
The ioctls still arrive at the KVM process's /dev/vhost-net, which forwards each to its
worker over a socket pair (with its fd argument as SCM_RIGHTS); a thread of the worker
performs them under the vq mutex (``VhostDev.lock``), as the ioctl's own thread does in the
kernel. ``VhostWorker`` is the KVM process's handle; ``main`` is the child.

Usage (the KVM process only): vhost-<owner pid> -m kvmproc.vhost_worker CTL_FD KVM_PID RUNDIR
"""

from __future__ import annotations

import array
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import trace
from common.kvm_abi import packb, unpackb
from kvmproc.vhost_net import (
    VhostNet,
    vhost_net_ioctl,
    vhost_net_open,
    vhost_net_release,
    vhost_net_set_features,
)

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
CTL_MSG_MAX = 1 << 20
MAX_FDS = 4
RELEASE_WAIT_S = 5.0
REPO = Path(__file__).resolve().parent.parent
FD_ARG_WIDTH = 10
"""A worker's fd argument is zero-padded to this width: room for ``-<pid>`` in argv[0]."""
_libc = ctypes.CDLL(None, use_errno=True)


class VhostWorkerGone(OSError):
    """The worker process is gone (killed, or failed): its device cannot be served."""


def _sendmsg(sock: socket.socket, msg: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([packb(msg)], anc)


def _recvmsg(sock: socket.socket) -> tuple[Any, list[int]] | None:
    fdsize = array.array("i").itemsize
    data, anc, _, _ = sock.recvmsg(CTL_MSG_MAX, socket.CMSG_SPACE(MAX_FDS * fdsize))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % fdsize])
            fds.extend(a)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return unpackb(data), fds


class VhostWorker:
    """The KVM process's side of one worker process: start it, forward ioctls, release it.

    A worker is started ahead of need (the KVM process keeps one spare, already past its
    interpreter's start-up, argv[0] ``vhost``): ``vhost_dev_set_owner`` hands it its owner
    with ``start``, and it takes the kthread's name. ``on_death`` is called (from a watcher
    thread) if an owned worker ends before its release.
    """

    def __init__(self, rundir: str | Path) -> None:
        self.owner = 0
        self.name = "vhost"
        self.released = False
        self.lock = threading.Lock()
        self._on_death: Callable[[VhostWorker, str], None] | None = None
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        paths = [str(REPO)] + [p for p in sys.path if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))
        try:
            self.proc = subprocess.Popen(
                [self.name, "-m", "kvmproc.vhost_worker",
                 str(theirs.fileno()).zfill(FD_ARG_WIDTH),
                 str(os.getpid()), str(rundir)],
                executable=sys.executable, pass_fds=(theirs.fileno(),), env=env,
                stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.sock = ours
        threading.Thread(target=self._watch, name=f"watch:vhost:{self.pid}",
                         daemon=True).start()

    def start(self, owner: int, init: dict[str, Any],
              on_death: Callable[[VhostWorker, str], None]) -> Any:
        """The worker is ``owner``'s from now on: its name, memory and features."""
        self.owner = owner
        self.name = f"vhost-{owner}"
        self._on_death = on_death
        return self.call(["init", {**init, "owner": owner}])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _watch(self) -> None:
        rc = self.proc.wait()
        if not self.released and self._on_death is not None:
            why = (f"killed by {signal.Signals(-rc).name}" if rc < 0
                   else f"exit status {rc}")
            self._on_death(self, f"vhost-net worker {self.name} (pid {self.pid}) died: {why}")

    def discard(self) -> None:
        """A spare nobody took: end it."""
        self.released = True
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def call(self, msg: list, fds: list[int] | tuple[int, ...] = ()) -> Any:
        """One request and its reply; VhostWorkerGone if the process is not there."""
        with self.lock:
            try:
                _sendmsg(self.sock, msg, fds)
                got = _recvmsg(self.sock)
            except OSError as e:
                raise VhostWorkerGone(f"{self.name}: {e}") from None
        if got is None:
            raise VhostWorkerGone(f"{self.name} is gone")
        return got[0]

    def release(self) -> dict[str, Any] | None:
        """The file went (or the KVM process ends): the worker stops its device, dumps its
        trace and ends; its last counters."""
        with self.lock:
            if self.released:
                return None
            self.released = True
        try:
            last = self.call(["release"])
        except VhostWorkerGone:
            last = None
        self.sock.close()
        try:
            self.proc.wait(RELEASE_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return last


# -- the worker process -------------------------------------------------------------------------

def set_proc_title(name: str) -> None:
    """Take the kthread's name: the thread name (PR_SET_NAME, what ``ps -o comm`` and
    psutil's name show) and argv[0], rewritten in place in the process's own argument area
    as setproctitle(3) does (the title, a NUL, then spaces to the area's last byte: the
    kernel then shows /proc/PID/cmdline as that one string)."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    arg_start, arg_end = int(fields[45]), int(fields[46])  # stat fields 48 and 49
    title = " ".join([name, "-m", "kvmproc.vhost_worker", str(int(sys.argv[1])),
                      *sys.argv[2:]]).encode()
    room = arg_end - arg_start
    if len(title) + 2 > room:
        return
    try:
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(arg_start)
            mem.write(title + b"\0" + b" " * (room - len(title) - 1))
    except OSError:
        pass


def serve_ctl(n: VhostNet, sock: socket.socket, init: dict[str, Any]) -> None:
    """Perform the forwarded ioctls until the release (or the KVM process's end)."""
    allowed = set(init["allowed"])
    ram = init["ram"]
    owner = init["owner"]
    try:
        while True:
            try:
                got = _recvmsg(sock)
            except OSError:
                got = None
            if got is None:
                break
            (kind, *args), fds = got
            if kind == "release":
                vhost_net_release(n)
                _sendmsg(sock, n.describe())
                return
            try:
                reply = vhost_net_ioctl(n, args[0], fds, owner, allowed, ram)
            except Exception as e:  # noqa: BLE001 - a bad request is an error, not a crash
                reply = [-22, f"{type(e).__name__}: {e}"]
            for fd in fds:
                os.close(fd)
            _sendmsg(sock, reply)
    except OSError:
        pass
    vhost_net_release(n)


def main() -> int:
    ctl_fd, kvm_pid, rundir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != kvm_pid:  # the KVM process died before prctl
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=ctl_fd)
    got = _recvmsg(sock)
    if got is None:
        return 1
    (_, init), _ = got
    name = f"vhost-{init['owner']}"
    set_proc_title(name)
    trace.register_thread(name)
    n = vhost_net_open()
    n.dev.vhost_dev_set_owner(init["owner"])
    ret = 0
    if init.get("features") is not None:
        ret = vhost_net_set_features(n, init["features"])
    _sendmsg(sock, [ret, None])
    ctl = threading.Thread(target=serve_ctl, args=(n, sock, init), name="vhost-ioctl",
                           daemon=True)
    ctl.start()
    code = 0
    try:
        n.dev.vhost_worker()
    except Exception:  # noqa: BLE001 - the KVM process reports the worker's death
        traceback.print_exc()
        code = 1
    ctl.join(RELEASE_WAIT_S)
    if trace.ENABLED:
        try:
            trace.dump(Path(rundir) / f"trace.kvm.{name}.{os.getpid()}.msgpack", "kvm")
        except OSError:
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
