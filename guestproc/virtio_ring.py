"""Stands for drivers/virtio/virtio_ring.c: the driver's side of a split virtqueue.

The driver owns the descriptor table and the avail ring and reads the used ring, all in
guest RAM (the views of ``common.vring``). Free descriptors are chained through a private
``desc_extra`` list, as in Linux 6.x, so the device can never corrupt the free list.

With VIRTIO_RING_F_INDIRECT_DESC a chain of several buffers takes one ring descriptor that
points to a table of its own (``virtqueue_use_indirect``). Linux kmallocs each table; here
every head owns a preallocated table of ``VRING_INDIRECT_MAX`` entries in guest RAM, so the
hot path allocates nothing and a table is free again exactly when its head is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.trace import trace_event, traced
from common.vring import (
    DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_USED_F_NO_NOTIFY,
    VringLayout,
    VringViews,
    vring_need_event,
)
from guestproc.kernel import IRQ_HANDLED, IRQ_NONE

VRING_INDIRECT_MAX = 16
"""Entries of each head's indirect table; a longer chain falls back to direct descriptors."""
INDIRECT_STRIDE = VRING_INDIRECT_MAX * VRING_DESC_SIZE

_desc_pack_into = DESC.pack_into

trace_virtqueue_add = trace_event("virtqueue_add_split")
trace_vring_interrupt = trace_event("vring_interrupt")
trace_virtqueue_get_buf = trace_event("virtqueue_get_buf")
trace_virtqueue_kick_prepare = trace_event("virtqueue_kick_prepare")


class BadRing(Exception):
    """BAD_RING(): the device returned something impossible; the queue is marked broken."""


class Virtqueue:
    """struct vring_virtqueue (split layout), with struct virtqueue's public fields."""

    __slots__ = (
        "index", "name", "vdev", "callback", "notify", "priv", "num", "layout", "v",
        "desc", "avail", "used_hdr", "used_ring", "avail_event_h",
        "free_head", "num_free", "num_added", "last_used_idx", "avail_idx_shadow",
        "avail_flags_shadow", "desc_state", "desc_extra_next", "desc_extra_flags",
        "event", "event_triggered", "broken", "weak_barriers", "kicks", "interrupts",
        "indir", "indir_base", "indir_max", "indirect_adds",
    )

    def __init__(self, index: int, layout: VringLayout, ram: memoryview, vdev: Any,
                 notify: Callable[[Virtqueue], bool], callback: Callable[[Virtqueue], None] | None,
                 name: str, event: bool, indirect_base: int = 0) -> None:
        num = layout.num
        self.index = index
        self.name = name
        self.vdev = vdev
        self.callback = callback
        self.notify = notify
        self.priv: Any = None
        self.num = num
        self.layout = layout
        self.v = VringViews(ram, layout)
        self.desc = self.v.desc
        self.avail = self.v.avail
        self.used_hdr = self.v.used_hdr
        self.used_ring = self.v.used_ring
        self.avail_event_h = self.v.avail_event_h
        self.free_head = 0
        self.num_free = num
        self.num_added = 0
        self.last_used_idx = 0
        self.avail_idx_shadow = 0
        self.avail_flags_shadow = 0
        self.desc_state: list[Any] = [None] * num
        self.desc_extra_next = [(i + 1) & (num - 1) for i in range(num)]
        self.desc_extra_flags = [0] * num
        self.event = event
        self.event_triggered = False
        self.broken = False
        self.weak_barriers = True
        self.kicks = 0
        self.interrupts = 0
        self.indir_base = indirect_base  # head h's table is at indir_base + h * INDIRECT_STRIDE
        self.indir_max = VRING_INDIRECT_MAX if indirect_base else 0
        self.indir = ram[indirect_base : indirect_base + num * INDIRECT_STRIDE] \
            if indirect_base else ram[0:0]
        self.indirect_adds = 0
        ram[layout.base : layout.end] = bytes(layout.size)
        if not callback:
            self.avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT
            if not event:
                self.avail[0] = self.avail_flags_shadow


def vring_indirect_size(num: int) -> int:
    """Bytes of guest RAM the indirect tables of a ring of ``num`` heads take."""
    return num * INDIRECT_STRIDE


def vring_create_virtqueue(index: int, num: int, base: int, ram: memoryview, vdev: Any,
                           notify: Callable[[Virtqueue], bool],
                           callback: Callable[[Virtqueue], None] | None, name: str,
                           event: bool, align: int = 4096, indirect_base: int = 0) -> Virtqueue:
    """``indirect_base``: where the heads' indirect tables lie (0: no indirect descriptors)."""
    return Virtqueue(index, VringLayout(num, base, align), ram, vdev, notify, callback, name,
                     event, indirect_base)


@traced
def virtqueue_add_split(vq: Virtqueue, out_sgs: list[tuple[int, int]],
                        in_sgs: list[tuple[int, int]], data: Any) -> int:
    """Chain the buffers into free descriptors and publish the head in the avail ring.

    Several buffers with indirect descriptors negotiated go into the head's own table, and
    the ring gives them one descriptor (virtqueue_use_indirect: indirect, total_sg > 1,
    num_free)."""
    if vq.broken:
        return -5  # -EIO
    head = vq.free_head
    if not in_sgs and len(out_sgs) == 1:  # one readable buffer: one direct descriptor
        if not vq.num_free:
            return -28  # -ENOSPC
        nxt = vq.desc_extra_next[head]
        vq.desc_extra_flags[head] = 0
        addr, length = out_sgs[0]
        _desc_pack_into(vq.desc, head << 4, addr, length, 0, nxt)
        vq.num_free -= 1
        vq.free_head = nxt
        total = 1
    else:
        total = len(out_sgs) + len(in_sgs)
        i = head
        nxt = vq.desc_extra_next
        fl = vq.desc_extra_flags
        if 1 < total <= vq.indir_max and vq.num_free:
            table = vq.indir
            off = head * INDIRECT_STRIDE
            n = 0
            for addr, length in out_sgs:
                n += 1
                _desc_pack_into(table, off, addr, length, VRING_DESC_F_NEXT if n < total else 0,
                                n)
                off += VRING_DESC_SIZE
            for addr, length in in_sgs:
                n += 1
                _desc_pack_into(table, off, addr, length,
                                VRING_DESC_F_WRITE | (VRING_DESC_F_NEXT if n < total else 0), n)
                off += VRING_DESC_SIZE
            fl[head] = VRING_DESC_F_INDIRECT
            _desc_pack_into(vq.desc, head << 4, vq.indir_base + head * INDIRECT_STRIDE,
                            total << 4, VRING_DESC_F_INDIRECT, nxt[head])
            vq.num_free -= 1
            vq.free_head = nxt[head]
            vq.indirect_adds += 1
        else:
            if vq.num_free < total:
                return -28  # -ENOSPC
            desc = vq.desc
            n = 0
            for addr, length in out_sgs:
                n += 1
                f = VRING_DESC_F_NEXT if n < total else 0
                fl[i] = f
                _desc_pack_into(desc, i << 4, addr, length, f, nxt[i])
                i = nxt[i]
            for addr, length in in_sgs:
                n += 1
                f = VRING_DESC_F_WRITE | (VRING_DESC_F_NEXT if n < total else 0)
                fl[i] = f
                _desc_pack_into(desc, i << 4, addr, length, f, nxt[i])
                i = nxt[i]
            vq.num_free -= total
            vq.free_head = i
    vq.desc_state[head] = data
    shadow = vq.avail_idx_shadow
    avail = vq.avail
    avail[2 + (shadow & (vq.num - 1))] = head
    # virtio_wmb: descriptors and ring entry are stored before the index that publishes them
    shadow = (shadow + 1) & 0xFFFF
    vq.avail_idx_shadow = shadow
    avail[1] = shadow
    vq.num_added += 1
    if trace_virtqueue_add.on:
        trace_virtqueue_add(vq=vq.name, head=head, avail_idx=(shadow - 1) & 0xFFFF, sgs=total)
    if vq.num_added == 0xFFFF:
        virtqueue_kick(vq)
    return 0


@traced
def virtqueue_add_outbuf(vq: Virtqueue, sg: list[tuple[int, int]], data: Any) -> int:
    return virtqueue_add_split(vq, sg, [], data)


@traced
def virtqueue_add_inbuf(vq: Virtqueue, sg: list[tuple[int, int]], data: Any) -> int:
    return virtqueue_add_split(vq, [], sg, data)


@traced
def virtqueue_kick_prepare(vq: Virtqueue) -> bool:
    """Does the device want to hear about the buffers added since the last kick?"""
    # virtio_mb: the avail index store is visible before the device's event index is read
    new = vq.avail_idx_shadow
    added = vq.num_added
    old = (new - added) & 0xFFFF
    vq.num_added = 0
    if vq.event:
        needs_kick = vring_need_event(vq.avail_event_h[0], new, old)
    else:
        needs_kick = not (vq.used_hdr[0] & VRING_USED_F_NO_NOTIFY)
    if trace_virtqueue_kick_prepare.on:
        trace_virtqueue_kick_prepare(vq=vq.name, old=old, new=new, needs_kick=needs_kick)
    return needs_kick


@traced
def virtqueue_notify(vq: Virtqueue) -> bool:
    if vq.broken:
        return False
    if not vq.notify(vq):
        vq.broken = True
        return False
    vq.kicks += 1
    return True


def virtqueue_kick(vq: Virtqueue) -> bool:
    if virtqueue_kick_prepare(vq):
        return virtqueue_notify(vq)
    return True


def more_used(vq: Virtqueue) -> bool:
    return vq.last_used_idx != vq.used_hdr[1]


def detach_buf_split(vq: Virtqueue, head: int) -> None:
    """Give the chain's descriptors back (an indirect head is one, its table freed with it)."""
    vq.desc_state[head] = None
    nxt = vq.desc_extra_next
    fl = vq.desc_extra_flags
    i = head
    n = 1
    while fl[i] & VRING_DESC_F_NEXT:
        i = nxt[i]
        n += 1
    nxt[i] = vq.free_head
    vq.free_head = head
    vq.num_free += n


@traced
def virtqueue_get_buf(vq: Virtqueue) -> tuple[Any, int] | None:
    """The next buffer the device has used, with the length it wrote; None if none."""
    last = vq.last_used_idx
    if last == vq.used_hdr[1]:
        return None
    # virtio_rmb: the used entry is read after the used index that published it
    num = vq.num
    used_ring = vq.used_ring
    slot = (last & (num - 1)) << 1
    head = used_ring[slot]
    length = used_ring[slot + 1]
    if head >= num:
        vq.broken = True
        raise BadRing(f"{vq.name}: id {head} out of range")
    data = vq.desc_state[head]
    if data is None:
        vq.broken = True
        raise BadRing(f"{vq.name}: id {head} is not a head!")
    detach_buf_split(vq, head)
    last = (last + 1) & 0xFFFF
    vq.last_used_idx = last
    if not (vq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT):
        vq.avail[2 + num] = last  # used_event: interrupt me for the next one
    if trace_virtqueue_get_buf.on:
        trace_virtqueue_get_buf(vq=vq.name, head=head, len=length, used_idx=(last - 1) & 0xFFFF)
    return data, length


def virtqueue_disable_cb(vq: Virtqueue) -> None:
    if vq.event_triggered:  # the device already fired: it will not fire again until re-armed
        return
    if not (vq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT):
        vq.avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT
        if vq.event:
            vq.avail[2 + vq.num] = 0
        else:
            vq.avail[0] = vq.avail_flags_shadow


def virtqueue_enable_cb_prepare(vq: Virtqueue) -> int:
    if vq.event_triggered:
        vq.event_triggered = False
    if vq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
        vq.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
        if not vq.event:
            vq.avail[0] = vq.avail_flags_shadow
    last = vq.last_used_idx
    vq.avail[2 + vq.num] = last
    return last


def virtqueue_poll(vq: Virtqueue, last_used_idx: int) -> bool:
    # virtio_mb: the used_event store is visible before the used index is read again
    return last_used_idx != vq.used_hdr[1]


def virtqueue_enable_cb(vq: Virtqueue) -> bool:
    """Re-enable callbacks; False if buffers arrived meanwhile (the caller must poll again)."""
    return not virtqueue_poll(vq, virtqueue_enable_cb_prepare(vq))


def virtqueue_enable_cb_delayed(vq: Virtqueue) -> bool:
    """Re-enable callbacks, but ask for the interrupt only after 3/4 of the pending buffers."""
    if vq.event_triggered:
        vq.event_triggered = False
    if vq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
        vq.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
        if not vq.event:
            vq.avail[0] = vq.avail_flags_shadow
    bufs = (((vq.avail_idx_shadow - vq.last_used_idx) & 0xFFFF) * 3) // 4
    vq.avail[2 + vq.num] = (vq.last_used_idx + bufs) & 0xFFFF
    return not (((vq.used_hdr[1] - vq.last_used_idx) & 0xFFFF) > bufs)


def virtqueue_detach_unused_buf(vq: Virtqueue) -> Any:
    for head, data in enumerate(vq.desc_state):
        if data is not None:
            detach_buf_split(vq, head)
            vq.avail_idx_shadow = (vq.avail_idx_shadow - 1) & 0xFFFF
            vq.avail[1] = vq.avail_idx_shadow
            return data
    return None


@traced
def vring_interrupt(irq: int, vq: Virtqueue) -> int:
    """The interrupt handler of one queue: call its callback if the device used buffers."""
    if not more_used(vq):
        return IRQ_NONE
    if vq.broken:
        return IRQ_HANDLED
    vq.interrupts += 1
    if vq.event:
        vq.event_triggered = True
    if trace_vring_interrupt.on:
        trace_vring_interrupt(irq=irq, vq=vq.name, used_idx=vq.used_hdr[1])
    if vq.callback is not None:
        vq.callback(vq)
    return IRQ_HANDLED
