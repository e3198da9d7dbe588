"""Stands for chardev/char-socket.c: ``-chardev socket,id=ID,path=PATH[,server=on,wait=off]
[,reconnect=S]``, a Unix stream socket a front-end (net/vhost-user.c) talks through.

As client it connects (``tcp_chr_connect_client_sync``); with ``reconnect=S`` a failed or
lost connection is tried again every S seconds from a main-loop timer
(``qemu_chr_socket_restart_timer`` -> ``tcp_chr_reconnect_timeout``). As server it listens
and takes one connection at a time (``tcp_chr_accept``). ``tcp_chr_connect`` reports
CHR_EVENT_OPENED to the front-end and watches the socket for hang-up; ``tcp_chr_disconnect``
reports CHR_EVENT_CLOSED.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from qemuproc.main_loop import MainLoop
from qemuproc.qemu_timer import QEMU_CLOCK_VIRTUAL, qemu_clock_get_ns, timer_del, timer_mod_ns

NANOSECONDS_PER_SECOND = 1_000_000_000


class QEMUChrEvent(IntEnum):
    CHR_EVENT_BREAK = 0
    CHR_EVENT_OPENED = 1
    CHR_EVENT_MUX_IN = 2
    CHR_EVENT_MUX_OUT = 3
    CHR_EVENT_CLOSED = 4


class ChardevError(Exception):
    """The chardev cannot be opened: one line, QEMU's wording."""


class SocketChardev:
    """struct SocketChardev for a Unix socket path."""

    def __init__(self, label: str, path: str, main_loop: MainLoop, server: bool = False,
                 wait: bool = True, reconnect: int = 0) -> None:
        self.label = label
        self.path = path
        self.main_loop = main_loop
        self.is_listen = server
        self.wait = wait
        self.reconnect_time = reconnect
        self.listener: socket.socket | None = None
        self.sock: socket.socket | None = None
        self.connected = False
        self.connects = 0
        self.disconnects = 0
        self.chr_event: Callable[[Any, QEMUChrEvent], None] | None = None
        self.opaque: Any = None
        self.reconnect_timer = main_loop.timer_new(tcp_chr_reconnect_timeout, self,
                                                   f"chardev-reconnect:{label}")

    def describe(self) -> dict[str, Any]:
        return {"id": self.label, "path": self.path, "server": self.is_listen,
                "reconnect": self.reconnect_time, "connected": self.connected,
                "connects": self.connects, "disconnects": self.disconnects}


def qmp_chardev_open_socket(s: SocketChardev) -> None:
    """Open the chardev: a server binds and listens (and with wait=on blocks for its first
    client); a client without reconnect must connect now."""
    if s.is_listen:
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.exists(s.path) and not os.path.isdir(s.path):
                os.unlink(s.path)
            lsock.bind(s.path)
            lsock.listen(1)
        except OSError as e:
            lsock.close()
            raise ChardevError(f"Failed to bind socket to {s.path}: {e.strerror}") from None
        s.listener = lsock
        if s.wait:
            print(f"QEMU waiting for connection on: disconnected:unix:{s.path},server=on",
                  flush=True)
            tcp_chr_accept_server_sync(s)
        else:
            tcp_chr_listen(s)
        return
    if not s.reconnect_time:
        tcp_chr_connect_client_sync(s)


def tcp_chr_listen(s: SocketChardev) -> None:
    assert s.listener is not None
    s.main_loop.qemu_set_fd_handler(s.listener.fileno(), tcp_chr_accept, None, s,
                                    f"chardev-listen:{s.label}")


def tcp_chr_accept(s: SocketChardev) -> None:
    assert s.listener is not None
    try:
        conn, _ = s.listener.accept()
    except BlockingIOError:
        return
    if s.connected:  # one client at a time
        conn.close()
        return
    s.main_loop.qemu_set_fd_handler(s.listener.fileno(), None, None, None)
    tcp_chr_new_client(s, conn)


def tcp_chr_accept_server_sync(s: SocketChardev) -> None:
    assert s.listener is not None
    conn, _ = s.listener.accept()
    tcp_chr_new_client(s, conn)


def tcp_chr_connect_client_sync(s: SocketChardev) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(s.path)
    except OSError as e:
        sock.close()
        raise ChardevError(f"Failed to connect to '{s.path}': {e.strerror}") from None
    tcp_chr_new_client(s, sock)


def tcp_chr_new_client(s: SocketChardev, sock: socket.socket) -> None:
    sock.setblocking(True)
    s.sock = sock
    tcp_chr_connect(s)


def tcp_chr_connect(s: SocketChardev) -> None:
    """Connected: watch for hang-up, then tell the front-end (CHR_EVENT_OPENED)."""
    assert s.sock is not None
    s.connected = True
    s.connects += 1
    s.main_loop.qemu_set_fd_handler(s.sock.fileno(), tcp_chr_hup, None, s,
                                    f"chardev:{s.label}")
    qemu_chr_be_event(s, QEMUChrEvent.CHR_EVENT_OPENED)


def tcp_chr_hup(s: SocketChardev) -> None:
    """The socket is readable while nobody waits for a reply: the peer hung up, or sent what
    no request asked for; either way the connection is over. (A reply another thread took
    meanwhile leaves nothing to read: not a hang-up.)"""
    if s.sock is None:
        return
    try:
        s.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return
    except OSError:
        pass
    tcp_chr_disconnect(s)


def tcp_chr_disconnect(s: SocketChardev) -> None:
    if not s.connected:
        return
    assert s.sock is not None
    s.main_loop.qemu_set_fd_handler(s.sock.fileno(), None, None, None)
    s.sock.close()
    s.sock = None
    s.connected = False
    s.disconnects += 1
    if s.is_listen:
        tcp_chr_listen(s)
    qemu_chr_be_event(s, QEMUChrEvent.CHR_EVENT_CLOSED)
    if s.reconnect_time and not s.is_listen:
        qemu_chr_socket_restart_timer(s)


def qemu_chr_socket_restart_timer(s: SocketChardev) -> None:
    timer_mod_ns(s.reconnect_timer, qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)
                 + s.reconnect_time * NANOSECONDS_PER_SECOND)


def tcp_chr_reconnect_timeout(s: SocketChardev) -> None:
    if s.connected:
        return
    try:
        tcp_chr_connect_client_sync(s)
    except ChardevError:
        qemu_chr_socket_restart_timer(s)


def qemu_chr_fe_wait_connected(s: SocketChardev, deadline_s: float) -> None:
    """tcp_chr_wait_connected: block until connected; a client with reconnect keeps trying
    (QEMU every ``reconnect`` seconds and forever; the replica every 0.1 s until the
    deadline, so that a run whose back end never comes says so)."""
    end = time.monotonic() + deadline_s
    while not s.connected:
        if s.is_listen:
            tcp_chr_accept_server_sync(s)
            continue
        try:
            tcp_chr_connect_client_sync(s)
        except ChardevError:
            if not s.reconnect_time or time.monotonic() > end:
                raise
            time.sleep(min(s.reconnect_time, 0.1))


def qemu_chr_fe_set_handlers(s: SocketChardev, chr_event: Callable[[Any, QEMUChrEvent], None],
                             opaque: Any) -> None:
    s.chr_event = chr_event
    s.opaque = opaque


def qemu_chr_be_event(s: SocketChardev, event: QEMUChrEvent) -> None:
    if s.chr_event is not None:
        s.chr_event(s.opaque, event)


def qemu_chr_fe_deinit(s: SocketChardev) -> None:
    timer_del(s.reconnect_timer)
    if s.sock is not None:
        s.main_loop.qemu_set_fd_handler(s.sock.fileno(), None, None, None)
        s.sock.close()
        s.sock = None
    if s.listener is not None:
        s.main_loop.qemu_set_fd_handler(s.listener.fileno(), None, None, None)
        s.listener.close()
        s.listener = None
        try:
            os.unlink(s.path)
        except OSError:
            pass
    s.connected = False
