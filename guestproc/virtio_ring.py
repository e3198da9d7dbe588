"""Stands for drivers/virtio/virtio_ring.c: the driver's side of split and packed virtqueues.

One ``Virtqueue`` (struct vring_virtqueue) holds both kinds' state; the public calls
(``virtqueue_add_outbuf``, ``virtqueue_kick_prepare``, ``virtqueue_get_buf``,
``virtqueue_enable_cb*``, ...) dispatch on ``vq.packed_ring`` to their ``_split``/``_packed``
halves, as Linux's do.

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
from common.vring_packed import (
    AVAIL_F,
    AVAIL_USED_F,
    DESC_FLAGS_H,
    PACKED_DESC,
    PACKED_DESC_NO_FLAGS,
    USED_F,
    VRING_PACKED_DESC_SIZE,
    VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    PackedLayout,
    PackedViews,
    layout_at,
)
from guestproc.kernel import IRQ_HANDLED, IRQ_NONE

VRING_INDIRECT_MAX = 16
"""Entries of each head's indirect table; a longer chain falls back to direct descriptors."""
INDIRECT_STRIDE = VRING_INDIRECT_MAX * VRING_DESC_SIZE

_desc_pack_into = DESC.pack_into
_pdesc_pack_into = PACKED_DESC.pack_into
_pdesc_head_pack_into = PACKED_DESC_NO_FLAGS.pack_into
_WRAP = 1 << VRING_PACKED_EVENT_F_WRAP_CTR

trace_virtqueue_add = trace_event("virtqueue_add_split")
trace_virtqueue_add_packed = trace_event("virtqueue_add_packed")
trace_vring_interrupt = trace_event("vring_interrupt")
trace_virtqueue_get_buf = trace_event("virtqueue_get_buf")
trace_virtqueue_kick_prepare = trace_event("virtqueue_kick_prepare")


class BadRing(Exception):
    """BAD_RING(): the device returned something impossible; the queue is marked broken."""


class Virtqueue:
    """struct vring_virtqueue, with struct virtqueue's public fields: the split members
    (``avail``, ``used_hdr``, ...) or the packed ones (``packed``, ``next_avail_idx``, the
    wrap counters, ...), as ``packed_ring`` says. For a packed ring ``last_used_idx`` carries
    the used wrap counter in bit 15 (``packed_used_wrap_counter``/``packed_last_used``)."""

    __slots__ = (
        "index", "name", "vdev", "callback", "notify", "priv", "num", "layout", "v",
        "desc", "avail", "used_hdr", "used_ring", "avail_event_h",
        "free_head", "num_free", "num_added", "last_used_idx", "avail_idx_shadow",
        "avail_flags_shadow", "desc_state", "desc_extra_next", "desc_extra_flags",
        "event", "event_triggered", "broken", "weak_barriers", "kicks", "interrupts",
        "indir", "indir_base", "indir_max", "indirect_adds",
        "packed_ring", "packed", "desc_h", "next_avail_idx", "avail_wrap_counter",
        "avail_used_flags", "event_flags_shadow", "desc_state_num", "desc_state_last",
    )

    def __init__(self, index: int, layout: VringLayout | PackedLayout, ram: memoryview,
                 vdev: Any, notify: Callable[[Virtqueue], bool],
                 callback: Callable[[Virtqueue], None] | None, name: str, event: bool,
                 indirect_base: int = 0) -> None:
        num = layout.num
        self.index = index
        self.name = name
        self.vdev = vdev
        self.callback = callback
        self.notify = notify
        self.priv: Any = None
        self.num = num
        self.layout = layout
        self.packed_ring = isinstance(layout, PackedLayout)
        self.packed: PackedViews | None = None
        self.desc_h: Any = None
        self.avail: Any = None
        self.used_hdr: Any = None
        self.used_ring: Any = None
        self.avail_event_h: Any = None
        self.v: Any
        if isinstance(layout, PackedLayout):
            ram[layout.desc : layout.desc + layout.desc_size] = bytes(layout.desc_size)
            ram[layout.driver : layout.driver + 4] = bytes(4)
            ram[layout.device : layout.device + 4] = bytes(4)
            self.v = self.packed = PackedViews.over(ram, layout)
            self.desc = self.packed.desc
            self.desc_h = self.packed.desc_h
        else:
            self.v = VringViews(ram, layout)
            self.desc = self.v.desc
            self.avail = self.v.avail
            self.used_hdr = self.v.used_hdr
            self.used_ring = self.v.used_ring
            self.avail_event_h = self.v.avail_event_h
        self.next_avail_idx = 0
        self.avail_wrap_counter = True
        self.avail_used_flags = AVAIL_F
        self.event_flags_shadow = VRING_PACKED_EVENT_FLAG_ENABLE
        self.desc_state_num = [0] * num
        self.desc_state_last = [0] * num
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
        if isinstance(layout, PackedLayout):
            self.last_used_idx = _WRAP
            if not callback:
                self.event_flags_shadow = VRING_PACKED_EVENT_FLAG_DISABLE
                self.v.driver[1] = self.event_flags_shadow
            return
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
                           event: bool, align: int = 4096, indirect_base: int = 0,
                           packed: bool = False) -> Virtqueue:
    """A ring of ``num`` at ``base`` in pages the transport took from the guest's allocator
    (``vring_size``, or ``vring_packed_size`` with VIRTIO_F_RING_PACKED: ``packed``).
    ``indirect_base``: where the heads' indirect tables lie (0: no indirect descriptors)."""
    if packed:
        return vring_create_virtqueue_packed(index, layout_at(base, num), ram, vdev, notify,
                                             callback, name, event, indirect_base)
    return Virtqueue(index, VringLayout(num, base, align), ram, vdev, notify, callback, name,
                     event, indirect_base)


def vring_create_virtqueue_packed(index: int, layout: PackedLayout, ram: memoryview, vdev: Any,
                                  notify: Callable[[Virtqueue], bool],
                                  callback: Callable[[Virtqueue], None] | None, name: str,
                                  event: bool, indirect_base: int = 0) -> Virtqueue:
    """A packed ring: zeroed descriptors, both wrap counters 1, the driver's event structure
    ENABLE (DISABLE without a callback)."""
    return Virtqueue(index, layout, ram, vdev, notify, callback, name, event, indirect_base)


def virtqueue_get_desc_addr(vq: Virtqueue) -> int:
    return vq.layout.desc


def virtqueue_get_avail_addr(vq: Virtqueue) -> int:
    """The driver area: the avail ring, or the packed ring's driver event structure."""
    lay = vq.layout
    return lay.driver if isinstance(lay, PackedLayout) else lay.avail


def virtqueue_get_used_addr(vq: Virtqueue) -> int:
    """The device area: the used ring, or the packed ring's device event structure."""
    lay = vq.layout
    return lay.device if isinstance(lay, PackedLayout) else lay.used


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


def virtqueue_add(vq: Virtqueue, out_sgs: list[tuple[int, int]],
                  in_sgs: list[tuple[int, int]], data: Any) -> int:
    if vq.packed_ring:
        return virtqueue_add_packed(vq, out_sgs, in_sgs, data)
    return virtqueue_add_split(vq, out_sgs, in_sgs, data)


@traced
def virtqueue_add_outbuf(vq: Virtqueue, sg: list[tuple[int, int]], data: Any) -> int:
    if vq.packed_ring:  # virtqueue_add, inlined on the hot path
        return virtqueue_add_packed(vq, sg, [], data)
    return virtqueue_add_split(vq, sg, [], data)


@traced
def virtqueue_add_inbuf(vq: Virtqueue, sg: list[tuple[int, int]], data: Any) -> int:
    if vq.packed_ring:  # virtqueue_add, inlined on the hot path
        return virtqueue_add_packed(vq, [], sg, data)
    return virtqueue_add_split(vq, [], sg, data)


def virtqueue_add_sgs(vq: Virtqueue, out_sgs: list[tuple[int, int]],
                      in_sgs: list[tuple[int, int]], data: Any) -> int:
    return virtqueue_add(vq, out_sgs, in_sgs, data)


@traced
def virtqueue_kick_prepare(vq: Virtqueue) -> bool:
    """Does the device want to hear about the buffers added since the last kick?"""
    if vq.packed_ring:
        return virtqueue_kick_prepare_packed(vq)
    return virtqueue_kick_prepare_split(vq)


def virtqueue_kick_prepare_split(vq: Virtqueue) -> bool:
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
    if vq.packed_ring:
        return more_used_packed(vq)
    return vq.last_used_idx != vq.used_hdr[1]  # more_used_split


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
    if vq.packed_ring:
        return virtqueue_get_buf_ctx_packed(vq)
    return virtqueue_get_buf_ctx_split(vq)


def virtqueue_get_buf_ctx_split(vq: Virtqueue) -> tuple[Any, int] | None:
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
    if vq.packed_ring:
        virtqueue_disable_cb_packed(vq)
    else:
        virtqueue_disable_cb_split(vq)


def virtqueue_disable_cb_split(vq: Virtqueue) -> None:
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
    if vq.packed_ring:
        return virtqueue_enable_cb_prepare_packed(vq)
    return virtqueue_enable_cb_prepare_split(vq)


def virtqueue_enable_cb_prepare_split(vq: Virtqueue) -> int:
    if vq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
        vq.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
        if not vq.event:
            vq.avail[0] = vq.avail_flags_shadow
    last = vq.last_used_idx
    vq.avail[2 + vq.num] = last
    return last


def virtqueue_poll(vq: Virtqueue, last_used_idx: int) -> bool:
    """Has the device used buffers past ``last_used_idx`` (virtqueue_enable_cb_prepare's)?"""
    if vq.broken:
        return False
    # virtio_mb: the event store is visible before the ring is read again
    if vq.packed_ring:
        return virtqueue_poll_packed(vq, last_used_idx)
    return last_used_idx != vq.used_hdr[1]  # virtqueue_poll_split


def virtqueue_enable_cb(vq: Virtqueue) -> bool:
    """Re-enable callbacks; False if buffers arrived meanwhile (the caller must poll again)."""
    return not virtqueue_poll(vq, virtqueue_enable_cb_prepare(vq))


def virtqueue_enable_cb_delayed(vq: Virtqueue) -> bool:
    """Re-enable callbacks, but ask for the interrupt only after 3/4 of the pending buffers."""
    if vq.event_triggered:
        vq.event_triggered = False
    if vq.packed_ring:
        return virtqueue_enable_cb_delayed_packed(vq)
    return virtqueue_enable_cb_delayed_split(vq)


def virtqueue_enable_cb_delayed_split(vq: Virtqueue) -> bool:
    if vq.avail_flags_shadow & VRING_AVAIL_F_NO_INTERRUPT:
        vq.avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
        if not vq.event:
            vq.avail[0] = vq.avail_flags_shadow
    bufs = (((vq.avail_idx_shadow - vq.last_used_idx) & 0xFFFF) * 3) // 4
    vq.avail[2 + vq.num] = (vq.last_used_idx + bufs) & 0xFFFF
    return not (((vq.used_hdr[1] - vq.last_used_idx) & 0xFFFF) > bufs)


def virtqueue_detach_unused_buf(vq: Virtqueue) -> Any:
    if vq.packed_ring:
        return virtqueue_detach_unused_buf_packed(vq)
    return virtqueue_detach_unused_buf_split(vq)


def virtqueue_detach_unused_buf_split(vq: Virtqueue) -> Any:
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
        trace_vring_interrupt(irq=irq, vq=vq.name, used_idx=vring_used_idx_hint(vq))
    if vq.callback is not None:
        vq.callback(vq)
    return IRQ_HANDLED


# -- the packed ring (virtio 1.1) ------------------------------------------------------------


def packed_used_wrap_counter(last_used_idx: int) -> bool:
    return bool(last_used_idx & _WRAP)


def packed_last_used(last_used_idx: int) -> int:
    return last_used_idx & ~_WRAP


def is_used_desc_packed(vq: Virtqueue, idx: int, used_wrap_counter: bool) -> bool:
    """AVAIL and USED of descriptor ``idx`` both equal the used wrap counter."""
    flags = vq.desc_h[(idx << 3) + DESC_FLAGS_H]
    used = bool(flags & USED_F)
    return bool(flags & AVAIL_F) == used and used == used_wrap_counter


def virtqueue_add_indirect_packed(vq: Virtqueue, out_sgs: list[tuple[int, int]],
                                  in_sgs: list[tuple[int, int]], data: Any) -> int:
    """The buffers into the id's own table; one ring descriptor (INDIRECT) points to it."""
    if vq.num_free < 1:
        return -28  # -ENOSPC
    head = vq.next_avail_idx
    buf_id = vq.free_head
    table = vq.indir
    base = buf_id * INDIRECT_STRIDE
    off = base
    for addr, length in out_sgs:
        _pdesc_pack_into(table, off, addr, length, 0, 0)
        off += VRING_PACKED_DESC_SIZE
    for addr, length in in_sgs:
        _pdesc_pack_into(table, off, addr, length, 0, VRING_DESC_F_WRITE)
        off += VRING_PACKED_DESC_SIZE
    _pdesc_head_pack_into(vq.desc, head << 4, vq.indir_base + base, off - base, buf_id)
    # virtio_wmb: the table and the head's fields are visible before the head's flags
    vq.desc_h[(head << 3) + DESC_FLAGS_H] = VRING_DESC_F_INDIRECT | vq.avail_used_flags
    vq.num_free -= 1
    n = head + 1
    if n >= vq.num:
        n = 0
        vq.avail_wrap_counter = not vq.avail_wrap_counter
        vq.avail_used_flags ^= AVAIL_USED_F
    vq.next_avail_idx = n
    vq.free_head = vq.desc_extra_next[buf_id]
    vq.desc_state_num[buf_id] = 1
    vq.desc_state_last[buf_id] = buf_id
    vq.desc_state[buf_id] = data
    vq.desc_extra_flags[buf_id] = VRING_DESC_F_INDIRECT
    vq.num_added += 1
    vq.indirect_adds += 1
    if trace_virtqueue_add_packed.on:
        trace_virtqueue_add_packed(vq=vq.name, head=buf_id, pos=head,
                                   sgs=len(out_sgs) + len(in_sgs))
    return 0


def virtqueue_add_packed(vq: Virtqueue, out_sgs: list[tuple[int, int]],
                         in_sgs: list[tuple[int, int]], data: Any) -> int:
    """Write the chain into the ring from next_avail_idx on, every descriptor carrying the
    buffer id (the free list's head) and the AVAIL/USED bits of the current wrap; the head's
    flags are stored last, which makes the whole chain available at once."""
    if vq.broken:
        return -5  # -EIO
    total = len(out_sgs) + len(in_sgs)
    if 1 < total <= vq.indir_max and vq.num_free:  # virtqueue_use_indirect
        return virtqueue_add_indirect_packed(vq, out_sgs, in_sgs, data)
    if vq.num_free < total:
        return -28  # -ENOSPC
    num = vq.num
    head = i = vq.next_avail_idx
    buf_id = curr = prev = vq.free_head
    nxt = vq.desc_extra_next
    desc = vq.desc
    c = 0
    head_flags = 0
    for sgs, write in ((out_sgs, 0), (in_sgs, VRING_DESC_F_WRITE)):
        for addr, length in sgs:
            c += 1
            flags = vq.avail_used_flags | (VRING_DESC_F_NEXT if c < total else 0) | write
            if i == head:
                head_flags = flags
                _pdesc_head_pack_into(desc, i << 4, addr, length, buf_id)
            else:
                _pdesc_pack_into(desc, i << 4, addr, length, buf_id, flags)
            prev = curr
            curr = nxt[curr]
            i += 1
            if i >= num:
                i = 0
                vq.avail_used_flags ^= AVAIL_USED_F
    if i <= head:
        vq.avail_wrap_counter = not vq.avail_wrap_counter
    vq.num_free -= total
    vq.next_avail_idx = i
    vq.free_head = curr
    vq.desc_state_num[buf_id] = total
    vq.desc_state_last[buf_id] = prev
    vq.desc_state[buf_id] = data
    vq.desc_extra_flags[buf_id] = 0
    # virtio_wmb: the descriptors after the head are visible before the head's flags
    vq.desc_h[(head << 3) + DESC_FLAGS_H] = head_flags
    vq.num_added += total
    if trace_virtqueue_add_packed.on:
        trace_virtqueue_add_packed(vq=vq.name, head=buf_id, pos=head, sgs=total)
    return 0


def virtqueue_kick_prepare_packed(vq: Virtqueue) -> bool:
    """Kick unless the device's event structure says DISABLE, or DESC with an offset (in
    its wrap) the buffers added since the last kick did not reach."""
    # virtio_mb: the new flags are visible before the device's event structure is read
    new = vq.next_avail_idx
    old = (new - vq.num_added) & 0xFFFF
    vq.num_added = 0
    device = vq.v.device
    flags = device[1]
    off_wrap = device[0]
    if flags != VRING_PACKED_EVENT_FLAG_DESC:
        needs_kick = flags != VRING_PACKED_EVENT_FLAG_DISABLE
    else:
        event_idx = off_wrap & ~_WRAP
        if bool(off_wrap & _WRAP) != vq.avail_wrap_counter:
            event_idx = (event_idx - vq.num) & 0xFFFF
        needs_kick = vring_need_event(event_idx, new, old)
    if trace_virtqueue_kick_prepare.on:
        trace_virtqueue_kick_prepare(vq=vq.name, old=old, new=new, needs_kick=needs_kick)
    return needs_kick


def detach_buf_packed(vq: Virtqueue, buf_id: int) -> None:
    """The buffer's ids go back on the free list (an indirect one's table is freed with it)."""
    vq.desc_state[buf_id] = None
    vq.desc_extra_next[vq.desc_state_last[buf_id]] = vq.free_head
    vq.free_head = buf_id
    vq.num_free += vq.desc_state_num[buf_id]


def more_used_packed(vq: Virtqueue) -> bool:
    last = vq.last_used_idx
    return is_used_desc_packed(vq, last & ~_WRAP, bool(last & _WRAP))


def virtqueue_get_buf_ctx_packed(vq: Virtqueue) -> tuple[Any, int] | None:
    """The buffer whose id the device wrote at last_used, in any order the device used them;
    last_used moves by the ring positions that buffer took, flipping the wrap counter."""
    if vq.broken or not more_used_packed(vq):
        return None
    # virtio_rmb: id and len are read after the flags that published them
    last_used_idx = vq.last_used_idx
    wrap = last_used_idx & _WRAP
    last_used = last_used_idx & ~_WRAP
    h = vq.desc_h
    base = last_used << 3
    buf_id = h[base + 6]
    length = h[base + 4] | (h[base + 5] << 16)
    num = vq.num
    if buf_id >= num:
        vq.broken = True
        raise BadRing(f"{vq.name}: id {buf_id} out of range")
    data = vq.desc_state[buf_id]
    if data is None:
        vq.broken = True
        raise BadRing(f"{vq.name}: id {buf_id} is not a head!")
    detach_buf_packed(vq, buf_id)
    last_used += vq.desc_state_num[buf_id]
    if last_used >= num:
        last_used -= num
        wrap ^= _WRAP
    vq.last_used_idx = last_used | wrap
    if vq.event_flags_shadow == VRING_PACKED_EVENT_FLAG_DESC:
        vq.v.driver[0] = vq.last_used_idx  # virtio_store_mb: interrupt me for the next one
    if trace_virtqueue_get_buf.on:
        trace_virtqueue_get_buf(vq=vq.name, head=buf_id, len=length, used_idx=base >> 3)
    return data, length


def virtqueue_disable_cb_packed(vq: Virtqueue) -> None:
    if vq.event_flags_shadow != VRING_PACKED_EVENT_FLAG_DISABLE:
        vq.event_flags_shadow = VRING_PACKED_EVENT_FLAG_DISABLE
        if vq.event_triggered:  # the device already fired: it will not fire again until re-armed
            return
        vq.v.driver[1] = vq.event_flags_shadow


def virtqueue_enable_cb_prepare_packed(vq: Virtqueue) -> int:
    driver = vq.v.driver
    if vq.event:
        driver[0] = vq.last_used_idx
        # virtio_wmb: off_wrap is visible before the flags
    if vq.event_flags_shadow == VRING_PACKED_EVENT_FLAG_DISABLE:
        vq.event_flags_shadow = (VRING_PACKED_EVENT_FLAG_DESC if vq.event
                                 else VRING_PACKED_EVENT_FLAG_ENABLE)
        driver[1] = vq.event_flags_shadow
    return vq.last_used_idx


def virtqueue_poll_packed(vq: Virtqueue, off_wrap: int) -> bool:
    return is_used_desc_packed(vq, off_wrap & ~_WRAP, bool(off_wrap & _WRAP))


def virtqueue_enable_cb_delayed_packed(vq: Virtqueue) -> bool:
    """With EVENT_IDX, ask for the interrupt once 3/4 of the outstanding descriptors are used
    (the offset and wrap counter that position has); True if none is used yet."""
    driver = vq.v.driver
    num = vq.num
    if vq.event:
        bufs = (num - vq.num_free) * 3 // 4
        last_used_idx = vq.last_used_idx
        wrap = bool(last_used_idx & _WRAP)
        used_idx = (last_used_idx & ~_WRAP) + bufs
        if used_idx >= num:
            used_idx -= num
            wrap = not wrap
        driver[0] = used_idx | (_WRAP if wrap else 0)
        # virtio_wmb: off_wrap is visible before the flags
    if vq.event_flags_shadow == VRING_PACKED_EVENT_FLAG_DISABLE:
        vq.event_flags_shadow = (VRING_PACKED_EVENT_FLAG_DESC if vq.event
                                 else VRING_PACKED_EVENT_FLAG_ENABLE)
        driver[1] = vq.event_flags_shadow
    # virtio_mb: the event structure is visible before the ring is read again
    return not more_used_packed(vq)


def virtqueue_detach_unused_buf_packed(vq: Virtqueue) -> Any:
    for buf_id, data in enumerate(vq.desc_state):
        if data is not None:
            detach_buf_packed(vq, buf_id)
            return data
    return None


def vring_used_pending(vq: Virtqueue) -> int:
    """Buffers the device has used that the driver has not taken yet (the replica's own
    count, for a reset's log: split reads the used index, packed walks the used ids)."""
    if not vq.packed_ring:
        return (vq.used_hdr[1] - vq.last_used_idx) & 0xFFFF
    n = 0
    last = vq.last_used_idx & ~_WRAP
    wrap = bool(vq.last_used_idx & _WRAP)
    h = vq.desc_h
    while n < vq.num and is_used_desc_packed(vq, last, wrap):
        buf_id = h[(last << 3) + 6]
        n += 1
        last += vq.desc_state_num[buf_id] if buf_id < vq.num and vq.desc_state_num[buf_id] else 1
        if last >= vq.num:
            last -= vq.num
            wrap = not wrap
    return n


def vring_used_idx_hint(vq: Virtqueue) -> int:
    """What trace events show as a queue's used index: the split ring's used->idx, or the
    packed ring's last_used position."""
    return vq.used_hdr[1] if vq.used_hdr is not None else vq.last_used_idx & ~_WRAP
