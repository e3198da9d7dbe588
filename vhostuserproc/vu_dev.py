"""Stands for libvhost-user.h's ``VuDev``, ``VuVirtq`` and ``VuVirtqElement``, and the
parts of libvhost-user.c both ring layouts use: ``vu_panic``, the address translation of
mapped guest RAM (``vu_gpa_to_va``, ``qva_to_va``) and ``virtqueue_map_desc``.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from common.trace import trace_event
from common.vhost_user_abi import VhostUserMsg
from common.vhost_user_inflight import VuVirtqInflight
from common.vring import VIRTQUEUE_MAX_SIZE

trace_vu_panic = trace_event("vu_panic")


class VuPanic(Exception):
    """Raised inside a handler to end in ``vu_panic``."""


@dataclass
class VuDevRegion:
    """One mapped region: guest-physical ``gpa``, the front-end's ``qva``, its mapping."""

    gpa: int
    size: int
    qva: int
    mmap_offset: int
    map: mmap.mmap
    mem: memoryview

    def unmap(self) -> None:
        """Unmap now, or (while a popped element still holds a view) when the last view
        goes."""
        self.mem.release()
        try:
            self.map.close()
        except BufferError:
            pass


@dataclass
class VuVirtqElement:
    """A popped chain: its head ``index`` and the guest buffers it maps, as memoryviews."""

    index: int
    out_sg: list[memoryview]
    in_sg: list[memoryview]
    ndescs: int = 1
    """Ring entries the chain took (packed rings advance by it)."""


@dataclass
class VuRing:
    """The views over one split ring in mapped guest RAM (``vq->vring``)."""

    num: int
    desc: memoryview
    avail: memoryview
    used_hdr: memoryview
    used_ring: memoryview
    avail_event_h: memoryview

    def release(self) -> None:
        for v in (self.desc, self.avail, self.used_hdr, self.used_ring, self.avail_event_h):
            v.release()


@dataclass
class VuVirtq:
    """``VuVirtq``: one queue's ring, indices, fds and state."""

    index: int
    num: int = 0
    desc_user_addr: int = 0
    avail_user_addr: int = 0
    used_user_addr: int = 0
    log_guest_addr: int = 0
    vring: VuRing | None = None
    packed: object | None = None
    """The packed ring's views and wrap counters (libvhost_user_packed.VuPackedRing)."""
    last_avail_idx: int = 0
    shadow_avail_idx: int = 0
    used_idx: int = 0
    signalled_used: int = 0
    signalled_used_valid: bool = False
    notification: bool = True
    inuse: int = 0
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enable: bool = False
    started: bool = False
    handler: Callable[[VuDev, int], None] | None = None
    inflight: VuVirtqInflight | None = None
    counter: int = 0
    resubmit_list: list[tuple[int, int]] = field(default_factory=list)
    kicks: int = 0
    calls: int = 0

    @property
    def ready(self) -> bool:
        return self.vring is not None or self.packed is not None


class VuDevIface(Protocol):
    """``VuDevIface``: the device's callbacks (vhost-user-bridge's ``vuiface``)."""

    def get_features(self, dev: VuDev) -> int: ...
    def set_features(self, dev: VuDev, features: int) -> None: ...
    def get_protocol_features(self, dev: VuDev) -> int: ...
    def process_msg(self, dev: VuDev, vmsg: VhostUserMsg) -> bool | None: ...
    def queue_set_started(self, dev: VuDev, qidx: int, started: bool) -> None: ...
    def queue_is_processed_in_order(self, dev: VuDev, qidx: int) -> bool: ...


@dataclass
class VuInflightInfo:
    fd: int = -1
    map: mmap.mmap | None = None
    size: int = 0


class VuDev:
    """``VuDev``: one connection's device state."""

    def __init__(self, max_queues: int, sock: object, panic: Callable[[VuDev, str], None],
                 set_watch: Callable[[int, int, Callable[[VuDev, int, int], None], int], None],
                 remove_watch: Callable[[int], None], iface: VuDevIface) -> None:
        self.sock = sock
        self.panic = panic
        self.set_watch = set_watch
        self.remove_watch = remove_watch
        self.iface = iface
        self.max_queues = max_queues
        self.regions: list[VuDevRegion] = []
        self.vq = [VuVirtq(i) for i in range(max_queues)]
        self.features = 0
        self.protocol_features = 0
        self.broken = False
        self.panic_reason = ""
        self.inflight_info = VuInflightInfo()
        self.messages = 0

    @property
    def nregions(self) -> int:
        return len(self.regions)


def vu_has_feature(dev: VuDev, fbit: int) -> bool:
    return bool(dev.features >> fbit & 1)


def vu_has_protocol_feature(dev: VuDev, fbit: int) -> bool:
    return bool(dev.protocol_features >> fbit & 1)


def vu_panic(dev: VuDev, msg: str) -> None:
    """The device is broken from here on; its owner hears why (``dev->panic``)."""
    dev.broken = True
    dev.panic_reason = msg
    if trace_vu_panic.on:
        trace_vu_panic(msg=msg)
    dev.panic(dev, msg)


# -- guest memory -----------------------------------------------------------------------------

def vu_gpa_to_va(dev: VuDev, length: int, guest_addr: int) -> memoryview | None:
    """The mapped bytes of guest-physical ``[guest_addr, +length)``, cut at the end of the
    region that holds ``guest_addr`` (the caller continues in the next); None outside every
    region or for a zero length."""
    if length <= 0:
        return None
    for r in dev.regions:
        off = guest_addr - r.gpa
        if 0 <= off < r.size:
            off += r.mmap_offset
            end = r.mmap_offset + r.size
            return r.mem[off : min(off + length, end)]
    return None


def qva_to_va(dev: VuDev, qemu_addr: int, length: int) -> memoryview | None:
    """The mapped bytes of the front-end's ``[qemu_addr, +length)``; None unless one region
    holds all of it (libvhost-user checks only the first byte)."""
    for r in dev.regions:
        off = qemu_addr - r.qva
        if 0 <= off and off + length <= r.size:
            off += r.mmap_offset
            return r.mem[off : off + length]
    return None


def virtqueue_map_desc(dev: VuDev, sg: list[memoryview], pa: int, sz: int) -> bool:
    if not sz:
        vu_panic(dev, "virtio: zero sized buffers are not allowed")
        return False
    while sz:
        if len(sg) >= VIRTQUEUE_MAX_SIZE:
            vu_panic(dev, "virtio: too many descriptors in indirect table")
            return False
        mv = vu_gpa_to_va(dev, sz, pa)
        if mv is None:
            vu_panic(dev, "virtio: invalid address for buffers")
            return False
        sg.append(mv)
        sz -= len(mv)
        pa += len(mv)
    return True
