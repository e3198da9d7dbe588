"""Stands for net/slirp.c: libslirp (common/libslirp.py) as QEMU's ``-netdev user`` net
client."""

from __future__ import annotations

from common.libslirp import Slirp
from common.trace import traced

__all__ = ["Slirp", "SlirpState", "net_slirp_receive"]


# -- net/slirp.c: slirp as a net client -------------------------------------------------------

class SlirpState:
    """The ``-netdev user`` backend: a NetClientState whose receive() feeds slirp."""

    def __init__(self, nc: object, slirp: Slirp) -> None:
        self.nc = nc
        self.slirp = slirp


@traced
def net_slirp_receive(nc: object, buf: memoryview | bytes) -> int:
    """slirp takes every frame: the size is always returned, never 0 ("queue it")."""
    s: SlirpState = nc.opaque  # type: ignore[attr-defined]
    s.slirp.input_queue = nc.rx_from_queue  # type: ignore[attr-defined]
    s.slirp.slirp_input(buf)
    return len(buf)
