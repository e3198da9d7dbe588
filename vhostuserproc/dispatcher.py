"""Stands for vhost-user-bridge.c's ``Dispatcher``: the fds the backend waits on and the
callback each one runs (``dispatcher_add``, ``dispatcher_remove``, ``dispatcher_wait``),
over epoll here rather than select."""

from __future__ import annotations

import select
from collections.abc import Callable

Callback = Callable[[int, object], None]


class Dispatcher:
    def __init__(self) -> None:
        self.ep = select.epoll()
        self.events: dict[int, tuple[Callback, object]] = {}

    def dispatcher_add(self, sock: int, ctx: object, cb: Callback) -> None:
        if sock in self.events:
            self.ep.modify(sock, select.EPOLLIN)
        else:
            self.ep.register(sock, select.EPOLLIN)
        self.events[sock] = (cb, ctx)

    def dispatcher_remove(self, sock: int) -> None:
        if self.events.pop(sock, None) is not None:
            try:
                self.ep.unregister(sock)
            except (OSError, ValueError):
                pass

    def dispatcher_wait(self, timeout_s: float) -> int:
        """Run the callback of every ready fd (unless an earlier callback removed it);
        the number that were ready."""
        ready = self.ep.poll(timeout_s)
        events = self.events
        for fd, _ in ready:
            e = events.get(fd)
            if e is not None:
                e[0](fd, e[1])
        return len(ready)

    def close(self) -> None:
        self.ep.close()
        self.events.clear()
