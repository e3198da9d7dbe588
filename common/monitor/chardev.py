"""Stands for chardev/char-socket.c as ``-chardev socket,path=P,server=on,wait=off``: the Unix
socket a monitor listens on.

The socket is created mode 0600 inside the run's 0700 directory and never on a network port;
a peer whose uid is neither ours nor root is turned away (SO_PEERCRED). Each connection is
served by a thread of its own, so a monitor answers while the process's loops are blocked.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

BACKLOG = 8


class SocketChardev:
    """A listening Unix socket; ``on_open(conn)`` serves each connection in its own thread."""

    def __init__(self, path: Path, name: str, on_open: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.name = name
        self.on_open = on_open
        self._sock: socket.socket | None = None

    def start(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(BACKLOG)
        self._sock = sock
        threading.Thread(target=self._accept_loop, name=self.name, daemon=True).start()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            uid = int.from_bytes(creds[4:8], sys.byteorder)
            if uid not in (os.getuid(), 0):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.on_open(conn)
        except (OSError, ValueError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
