"""The vhost-user backend process (vhost-user-bridge's ``main``, ``vubr_new``, ``vubr_run``):

    python -m vhostuserproc --socket SOCK [--server] [--netdev user|tap] [--queues N]
                            [--summary-json F] [--poll] [--run RUNDIR]

As a server it listens on SOCK and serves one front-end at a time, taking the next when one
goes; as a client it connects to SOCK and ends when the front-end goes. One line when it
listens (or has connected); on SIGINT or SIGTERM it exits 0 after a summary of the frames
it moved each way, per queue pair. A device that panicked closes its connection.

``--netdev tap`` uses the run's namespace and tap with ``--run``; alone it makes a namespace
of its own (``vnr-<id>``, its tap ``tap0`` at 10.0.2.2/24), registered under this process
so that the run cleanup removes it after a kill -9, and removes it on exit.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import secrets
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import posix_ipc
import psutil

from common import netns, trace
from common.ipc import RUN_HEADER, RUN_HEADER_SIZE, RUN_MAGIC, RUN_VERSION, RunConfig, inflight_name
from common.threads import set_thread_name
from common.vhost_user_abi import recv_msg
from vhostuserproc.dispatcher import Dispatcher
from vhostuserproc.libvhost_user import vu_deinit, vu_dispatch, vu_panic
from vhostuserproc.monitor import ROLE, vu_monitor
from vhostuserproc.net_backend import SlirpBackend, TapBackend
from vhostuserproc.vhost_user_bridge import VubrDev, eventfd_count
from vhostuserproc.vu_dev import VuDev

VHOST_USER_BRIDGE_MAX_QUEUES = 8
"""Virtqueues one device serves (four pairs), as vhost-user-bridge's limit."""
SUN_PATH_MAX = 107


class Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise Usage(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="vhost-user-bridge", add_help=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--server", action="store_true")
    p.add_argument("--netdev", choices=("user", "tap"), default="user")
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--summary-json")
    p.add_argument("--poll", action="store_true")
    p.add_argument("--run")
    a = p.parse_args(argv)
    if not 1 <= a.queues <= VHOST_USER_BRIDGE_MAX_QUEUES // 2:
        raise Usage(f"--queues {a.queues}: this backend gives 1 to "
                    f"{VHOST_USER_BRIDGE_MAX_QUEUES // 2} queue pairs")
    if len(os.fsencode(a.socket)) > SUN_PATH_MAX:
        raise Usage(f"--socket {a.socket}: longer than a Unix socket path can be")
    if a.summary_json and not Path(a.summary_json).resolve().parent.is_dir():
        raise Usage(f"--summary-json {a.summary_json}: no such directory")
    if a.run and not Path(a.run).is_dir():
        raise Usage(f"--run {a.run}: no such run directory")
    if a.netdev == "tap" and (why := netns.privilege_problem()):
        raise Usage(f"--netdev tap {why}")
    return a


def open_socket(path: str, server: bool) -> socket.socket:
    """vubr_new: the listening socket (an old socket file at the path is replaced, as
    vhost-user-bridge unlinks it) or the connected one."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if server:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise Usage(f"--socket {path}: exists and is not a socket")
                os.unlink(path)
            s.bind(path)
            s.listen(1)
        else:
            s.connect(path)
    except OSError as e:
        s.close()
        raise Usage(f"--socket {path}: cannot {'listen' if server else 'connect'}: "
                    f"{e.strerror}") from None
    except Usage:
        s.close()
        raise
    return s


class OwnNamespace:
    """A namespace of this process's own for ``--netdev tap`` alone, with the run header
    segment that names this process its owner (common/ipc.py's run_owner)."""

    def __init__(self, pairs: int) -> None:
        self.rid = secrets.token_hex(8)
        self.shm_name = inflight_name(self.rid)
        shm = posix_ipc.SharedMemory(self.shm_name, posix_ipc.O_CREX, size=RUN_HEADER_SIZE)
        try:
            with mmap.mmap(shm.fd, RUN_HEADER_SIZE) as m:
                RUN_HEADER.pack_into(m, 0, RUN_MAGIC, RUN_VERSION, os.getpid(),
                                     psutil.Process().create_time())
        finally:
            shm.close_fd()
        try:
            self.name = netns.create(self.rid, multi_queue=pairs > 1)
            netns._in_netns(self.name, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        netns.delete(netns.netns_name(self.rid))
        try:
            posix_ipc.unlink_shared_memory(self.shm_name)
        except posix_ipc.ExistentialError:
            pass


class Bridge:
    """The process: the dispatcher, the listening or connected socket, the device."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.dispatcher = Dispatcher()
        self.own_ns: OwnNamespace | None = None
        self.tap: TapBackend | None = None
        self.slirp: SlirpBackend | None = None
        self.slirp_fds: set[int] = set()
        pairs = a.queues
        if a.netdev == "tap":
            if a.run:
                ns = netns.netns_name(RunConfig.load(a.run).rid)
            else:
                self.own_ns = OwnNamespace(pairs)
                ns = self.own_ns.name
            self.ns = ns
            with netns.entered(ns):
                self.tap = TapBackend(netns.TAP_NAME, pairs)
            backend: TapBackend | SlirpBackend = self.tap
        else:
            self.ns = ""
            self.slirp = SlirpBackend(pairs, self._slirp_frame)
            backend = self.slirp
            if a.run:  # the run's -netdev user,hostfwd=: host datagrams to the guest
                for host_port, guest_port in RunConfig.load(a.run).options.get("hostfwd") or []:
                    self.slirp.slirp.slirp_add_hostfwd(host_port, guest_port)
        self.vubr = VubrDev(pairs, backend, a.poll, self._watch_backend)
        self.mon = vu_monitor(self.vubr, a.run) if a.run else None
        if self.slirp is not None:  # what slirp sends waits where vubr_flush_held looks
            self.vubr.held = self.slirp.pending
        self.listen_sock: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.connections = 0
        self.kicks = [0] * (2 * pairs)
        self.calls = [0] * (2 * pairs)
        self.messages = 0
        self.panicked = False
        self.started = time.monotonic()
        self.cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    # -- the front-end's socket ---------------------------------------------------------------

    def start(self, s: socket.socket) -> str:
        a = self.a
        if a.server:
            self.listen_sock = s
            self.dispatcher.dispatcher_add(s.fileno(), None, self.vubr_accept_cb)
            how = f"listening on {a.socket}"
        else:
            self.vubr_attach(s)
            how = f"connected to {a.socket}"
        host = (f"tap {netns.TAP_NAME} in netns {self.ns}" if self.tap else
                "user (slirp, 127.0.0.1)")
        return (f"vhost-user-bridge: {how}, {a.queues} queue pair(s), netdev {host}"
                f"{', poll mode' if a.poll else ''}")

    def vubr_accept_cb(self, fd: int, ctx: object) -> None:
        assert self.listen_sock is not None
        try:
            conn, _ = self.listen_sock.accept()
        except OSError:
            return
        self.dispatcher.dispatcher_remove(fd)
        self.vubr_attach(conn)

    def vubr_attach(self, conn: socket.socket) -> None:
        conn.set_inheritable(False)
        self.conn = conn
        self.connections += 1
        dev = VuDev(self.vubr.max_queues, conn, self._panic, self._set_watch,
                    self.dispatcher.dispatcher_remove, self.vubr)
        self.vubr.vudev = dev
        self.dispatcher.dispatcher_add(conn.fileno(), None, self.vubr_receive_cb)

    def vubr_receive_cb(self, fd: int, ctx: object) -> None:
        dev = self.vubr.vudev
        assert dev is not None and self.conn is not None
        try:
            vmsg = recv_msg(self.conn)
        except EOFError:
            self.vubr_detach()
            return
        except (ValueError, OSError) as e:
            vu_panic(dev, f"Error while reading: {e}")
            self.vubr_detach()
            return
        if not vu_dispatch(dev, vmsg):
            self.vubr_detach()

    def _panic(self, dev: VuDev, msg: str) -> None:
        """vubr_panic; the connection closes once the callback that panicked returns."""
        self.vubr.vubr_panic(dev, msg)
        self.panicked = True

    def _set_watch(self, fd: int, condition: int, cb: object, data: int) -> None:
        dev = self.vubr.vudev

        def watch_cb(_fd: int, _ctx: object) -> None:
            cb(dev, condition, data)  # type: ignore[operator]
        self.dispatcher.dispatcher_add(fd, None, watch_cb)

    def vubr_detach(self) -> None:
        """The connection ends (the front-end went, or the device panicked): every fd and
        mapping it brought goes; a server listens again, a client ends."""
        self.panicked = False
        dev = self.vubr.vudev
        if dev is not None:
            for vq in dev.vq:
                if self.a.poll and vq.kick_fd != -1:
                    vq.kicks += eventfd_count(vq.kick_fd)
                self.kicks[vq.index] += vq.kicks
                self.calls[vq.index] += vq.calls
                vq.kicks = vq.calls = 0
            self.messages += dev.messages
            for pair in range(self.vubr.pairs):
                self._watch_backend(pair, False)
            vu_deinit(dev)
            self.vubr.vudev = None
        for q in self.vubr.held:
            q.clear()
        if self.conn is not None:
            self.dispatcher.dispatcher_remove(self.conn.fileno())
            self.conn.close()
            self.conn = None
        if self.listen_sock is not None:
            self.dispatcher.dispatcher_add(self.listen_sock.fileno(), None, self.vubr_accept_cb)
        else:
            self.vubr.quit = True

    # -- the host side ------------------------------------------------------------------------

    def _watch_backend(self, pair: int, on: bool) -> None:
        if self.tap is None or self.a.poll:
            return
        fd = self.tap.fds[pair]
        if on:
            self.dispatcher.dispatcher_add(fd, pair, self._tap_readable)
        else:
            self.dispatcher.dispatcher_remove(fd)

    def _tap_readable(self, fd: int, pair: object) -> None:
        assert self.tap is not None
        self.vubr.vubr_backend_recv_cb(pair, self.tap.recv)  # type: ignore[arg-type]

    def _slirp_frame(self, pair: int) -> None:
        self.vubr.vubr_flush_held(pair)

    def _slirp_fds(self) -> float:
        """Slirp's sockets into the dispatcher (slirp_pollfds_fill); its timeout."""
        assert self.slirp is not None
        fds: list[tuple[int, int]] = []
        timeout_ms = self.slirp.slirp.slirp_pollfds_fill(fds, 200)
        now = {fd for fd, _ in fds}
        for fd in self.slirp_fds - now:
            self.dispatcher.dispatcher_remove(fd)
        for fd in now - self.slirp_fds:
            self.dispatcher.dispatcher_add(fd, None, self._slirp_readable)
        self.slirp_fds = now
        return timeout_ms / 1000

    def _slirp_readable(self, fd: int, ctx: object) -> None:
        assert self.slirp is not None
        self.slirp.slirp.slirp_pollfds_poll({fd: 1})

    # -- the loop -----------------------------------------------------------------------------

    def vubr_run(self, wakeup_fd: int) -> None:
        self.dispatcher.dispatcher_add(wakeup_fd, None, lambda fd, ctx: _drain(fd))
        poll_recv = self.tap.recv if self.tap is not None else None
        while not self.vubr.quit:
            timeout = self._slirp_fds() if self.slirp is not None else 0.2
            dev = self.vubr.vudev
            if self.a.poll and dev is not None and not dev.broken:
                self.dispatcher.dispatcher_wait(0)
                dev = self.vubr.vudev
                if dev is not None and not dev.broken:
                    self.vubr.vubr_poll(dev, poll_recv)
                    if self.slirp is not None:
                        for pair in range(self.vubr.pairs):
                            self.vubr.vubr_flush_held(pair)
            else:
                self.dispatcher.dispatcher_wait(timeout)
            if self.panicked:
                self.vubr_detach()

    def summary(self) -> dict:
        out = self.vubr.summary()
        dev = self.vubr.vudev
        for i, q in enumerate(out["queues"]):
            for name, n in (("rx", 2 * i), ("tx", 2 * i + 1)):
                live = dev.vq[n] if dev is not None else None
                extra_kicks = 0
                if live is not None and self.a.poll and live.kick_fd != -1:
                    extra_kicks = eventfd_count(live.kick_fd)
                    live.kicks += extra_kicks
                q[f"{name}_kicks"] = self.kicks[n] + (live.kicks if live else 0)
                q[f"{name}_calls"] = self.calls[n] + (live.calls if live else 0)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out.update({
            "poll": self.a.poll, "netdev": self.a.netdev, "connections": self.connections,
            "messages": self.messages + (dev.messages if dev else 0),
            "panics": self.vubr.panics,
            "cpu_s": round(ru.ru_utime + ru.ru_stime - self.cpu0.ru_utime - self.cpu0.ru_stime,
                           3),
            "wall_s": round(time.monotonic() - self.started, 3),
        })
        return out

    def close(self) -> None:
        if self.mon is not None:
            self.mon.close()
        if self.vubr.vudev is not None:
            vu_deinit(self.vubr.vudev)
        if self.conn is not None:
            self.conn.close()
        if self.listen_sock is not None:
            self.listen_sock.close()
            try:
                os.unlink(self.a.socket)
            except OSError:
                pass
        if self.tap is not None:
            self.tap.close()
        if self.slirp is not None:
            self.slirp.close()
        if self.own_ns is not None:
            self.own_ns.close()
        self.dispatcher.close()


def _drain(fd: int) -> None:
    try:
        os.read(fd, 512)
    except BlockingIOError:
        pass


def print_summary(s: dict) -> None:
    for q in s["queues"]:
        print(f"queue pair {q['pair']}: guest->host {q['tx_frames']} frames "
              f"({q['tx_bytes']} bytes, {q['tx_dropped']} dropped), host->guest "
              f"{q['rx_frames']} frames ({q['rx_bytes']} bytes, {q['rx_dropped']} dropped); "
              f"kicks tx {q['tx_kicks']} rx {q['rx_kicks']}, calls tx {q['tx_calls']} "
              f"rx {q['rx_calls']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    set_thread_name("vhostuserproc")  # the process's name, as ps and the benchmark find it
    try:
        a = parse_args(sys.argv[1:] if argv is None else argv)
    except Usage as e:
        print(f"vhost-user-bridge: {e}", file=sys.stderr)
        return 2
    quit_r, quit_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stop = {"sig": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stop["sig"] = signum
        bridge.vubr.quit = True

    signal.set_wakeup_fd(quit_w)
    try:
        s = open_socket(a.socket, a.server)
    except Usage as e:
        print(f"vhost-user-bridge: {e}", file=sys.stderr)
        return 2
    bridge: Bridge
    try:
        bridge = Bridge(a)
    except (OSError, ValueError, posix_ipc.Error) as e:
        s.close()
        if a.server:
            os.unlink(a.socket)
        print(f"vhost-user-bridge: --netdev {a.netdev}: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # a supervisor blocks SIGTERM while it starts its children, who inherit the mask
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        print(bridge.start(s), flush=True)
        bridge.vubr_run(quit_r)
        s = bridge.summary()
    finally:
        bridge.close()
        if trace.ENABLED and a.run:
            trace.dump(Path(a.run) / f"trace.{ROLE}.msgpack", ROLE)
    print_summary(s)
    if a.summary_json:
        Path(a.summary_json).write_text(json.dumps(s, indent=1))
    if stop["sig"] or not bridge.vubr.panics:
        return 0
    print(f"vhost-user-bridge: {bridge.vubr.panics[-1]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
