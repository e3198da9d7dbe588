"""The packed virtqueue for the vhost-user backend, which libvhost-user does not have: the
device side of a virtio 1.1 packed ring as QEMU's hw/virtio/virtio.c serves it
(``virtqueue_packed_pop``, ``virtqueue_packed_fill_desc``, ``virtqueue_packed_flush``,
``virtio_packed_should_notify``, ``virtio_queue_packed_set_notification``), under the
``vu_queue_*`` entry points of vhostuserproc/libvhost_user.py.

SET/GET_VRING_BASE carry the avail index and its wrap counter in bits 0-15 and the used
index and its wrap counter in bits 16-31 (QEMU's ``virtio_queue_packed_get_last_avail_idx``);
a front-end that sends zero there (DPDK's virtio-user) starts the used side where the avail
side starts, as DPDK's lib/vhost takes it.

In an indirect table, device-writable entries followed by a readable one are taken as
readable, as DPDK's lib/vhost reads a transmit chain: DPDK's virtio PMD (22.11,
``virtqueue_enqueue_xmit_packed``) skips the flags store of the table entry whose index
equals the chain's ring position, which keeps the VRING_DESC_F_WRITE its table was
initialised with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.virtio_abi import VIRTIO_RING_F_EVENT_IDX
from common.vring import (
    VIRTQUEUE_MAX_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    vring_need_event,
)
from common.vring_packed import (
    AVAIL_USED_F,
    DESC_FLAGS_H,
    EVENT_FLAGS_H,
    EVENT_OFF_WRAP_H,
    PACKED_DESC,
    VRING_PACKED_DESC_SIZE,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    VRING_PACKED_EVENT_SIZE,
    PackedViews,
    is_avail_desc,
)
from vhostuserproc.vu_dev import (
    VuDev,
    VuVirtq,
    VuVirtqElement,
    qva_to_va,
    virtqueue_map_desc,
    vu_gpa_to_va,
    vu_has_feature,
    vu_panic,
)

_unpack = PACKED_DESC.unpack_from
_pack = PACKED_DESC.pack_into


@dataclass
class VuPackedRing:
    """A packed queue's views and the device's positions and wrap counters."""

    views: PackedViews
    last_avail_wrap_counter: bool = True
    used_wrap_counter: bool = True
    used_elems: list[VuVirtqElement | None] = field(default_factory=list)
    used_lens: list[int] = field(default_factory=list)

    def release(self) -> None:
        self.views.release()


def map_ring_packed(dev: VuDev, vq: VuVirtq) -> bool:
    """desc_user_addr is the descriptor ring, avail_user_addr the driver event area,
    used_user_addr the device event area. True when any lies outside the regions."""
    n = vq.num
    if not 0 < n <= VIRTQUEUE_MAX_SIZE:
        return True
    desc = qva_to_va(dev, vq.desc_user_addr, VRING_PACKED_DESC_SIZE * n)
    drv = qva_to_va(dev, vq.avail_user_addr, VRING_PACKED_EVENT_SIZE)
    devev = qva_to_va(dev, vq.used_user_addr, VRING_PACKED_EVENT_SIZE)
    if desc is None or drv is None or devev is None or (vq.desc_user_addr | vq.avail_user_addr
                                                         | vq.used_user_addr) & 1:
        for v in (desc, drv, devev):
            if v is not None:
                v.release()
        return True
    old = vq.packed
    ring = VuPackedRing(PackedViews(n, desc, drv, devev))
    if isinstance(old, VuPackedRing):
        ring.last_avail_wrap_counter = old.last_avail_wrap_counter
        ring.used_wrap_counter = old.used_wrap_counter
    else:
        ring.last_avail_wrap_counter = getattr(vq, "_avail_wrap", True)
        ring.used_wrap_counter = getattr(vq, "_used_wrap", True)
    vq.packed = ring
    return False


def vu_set_vring_base_packed(vq: VuVirtq, num: int) -> None:
    avail = num & 0xFFFF
    used = num >> 16 & 0xFFFF or avail
    vq.shadow_avail_idx = vq.last_avail_idx = avail & 0x7FFF
    vq.used_idx = used & 0x7FFF
    vq._avail_wrap = bool(avail & 0x8000)  # type: ignore[attr-defined]
    vq._used_wrap = bool(used & 0x8000)  # type: ignore[attr-defined]
    if isinstance(vq.packed, VuPackedRing):
        vq.packed.last_avail_wrap_counter = vq._avail_wrap  # type: ignore[attr-defined]
        vq.packed.used_wrap_counter = vq._used_wrap  # type: ignore[attr-defined]


def vu_get_vring_base_packed(vq: VuVirtq) -> int:
    p = vq.packed
    assert isinstance(p, VuPackedRing)
    vq._avail_wrap = p.last_avail_wrap_counter  # type: ignore[attr-defined]
    vq._used_wrap = p.used_wrap_counter  # type: ignore[attr-defined]
    return (vq.last_avail_idx | p.last_avail_wrap_counter << 15
            | (vq.used_idx | p.used_wrap_counter << 15) << 16)


def vu_queue_packed_empty(dev: VuDev, vq: VuVirtq) -> bool:
    p = vq.packed
    assert isinstance(p, VuPackedRing)
    return not is_avail_desc(p.views.desc_h[(vq.last_avail_idx << 3) + DESC_FLAGS_H],
                             p.last_avail_wrap_counter)


def _walk(dev: VuDev, vq: VuVirtq, pos: int, wrap: bool,
          out_sg: list[memoryview] | None, in_sg: list[memoryview] | None
          ) -> tuple[int, int, int, int] | None:
    """Read the chain at ``pos``: (buffer id, ring entries, in bytes, out bytes); maps the
    buffers when given lists. None after vu_panic."""
    p = vq.packed
    assert isinstance(p, VuPackedRing)
    desc = p.views.desc
    num = vq.num
    addr, length, buf_id, flags = _unpack(desc, pos << 4)
    in_b = out_b = 0
    entries = 0
    if flags & VRING_DESC_F_INDIRECT:
        if length % VRING_PACKED_DESC_SIZE or not 0 < length <= VIRTQUEUE_MAX_SIZE * 16:
            vu_panic(dev, "Invalid size for indirect buffer table")
            return None
        table = vu_gpa_to_va(dev, length, addr)
        if table is None or len(table) != length:
            vu_panic(dev, "Invalid indirect buffer table")
            return None
        for k in range(length // VRING_PACKED_DESC_SIZE):
            a, ln, _, f = _unpack(table, k << 4)
            if f & VRING_DESC_F_WRITE:
                in_b += ln
                if in_sg is not None and not virtqueue_map_desc(dev, in_sg, a, ln):
                    return None
            else:
                if in_b:  # a stale WRITE before a readable entry: readable (see above)
                    out_b, in_b = out_b + in_b, 0
                    if out_sg is not None and in_sg is not None:
                        out_sg += in_sg
                        in_sg.clear()
                out_b += ln
                if out_sg is not None and not virtqueue_map_desc(dev, out_sg, a, ln):
                    return None
        return buf_id, 1, in_b, out_b
    while True:
        entries += 1
        if flags & VRING_DESC_F_WRITE:
            in_b += length
            if in_sg is not None and not virtqueue_map_desc(dev, in_sg, addr, length):
                return None
        else:
            if in_b:
                vu_panic(dev, "Incorrect order for descriptors")
                return None
            out_b += length
            if out_sg is not None and not virtqueue_map_desc(dev, out_sg, addr, length):
                return None
        if not flags & VRING_DESC_F_NEXT:
            return buf_id, entries, in_b, out_b
        if entries >= num:
            vu_panic(dev, "Looped descriptor")
            return None
        pos += 1
        if pos >= num:
            pos, wrap = 0, not wrap
        addr, length, buf_id, flags = _unpack(desc, pos << 4)
        if not is_avail_desc(flags, wrap):
            vu_panic(dev, "Chained descriptor not available")
            return None


def vu_queue_packed_pop(dev: VuDev, vq: VuVirtq) -> VuVirtqElement | None:
    p = vq.packed
    if dev.broken or not isinstance(p, VuPackedRing):
        return None
    pos = vq.last_avail_idx
    if not is_avail_desc(p.views.desc_h[(pos << 3) + DESC_FLAGS_H], p.last_avail_wrap_counter):
        return None
    if vq.inuse >= vq.num:
        vu_panic(dev, "Virtqueue size exceeded")
        return None
    out_sg: list[memoryview] = []
    in_sg: list[memoryview] = []
    r = _walk(dev, vq, pos, p.last_avail_wrap_counter, out_sg, in_sg)
    if r is None:
        return None
    buf_id, entries, _, _ = r
    if buf_id >= vq.num:
        vu_panic(dev, f"Guest says buffer id {buf_id} is available")
        return None
    pos += entries
    if pos >= vq.num:
        pos -= vq.num
        p.last_avail_wrap_counter = not p.last_avail_wrap_counter
    vq.shadow_avail_idx = vq.last_avail_idx = pos
    vq.inuse += entries
    return VuVirtqElement(buf_id, out_sg, in_sg, entries)


def vu_queue_packed_get_avail_bytes(dev: VuDev, vq: VuVirtq, max_in_bytes: int,
                                    max_out_bytes: int) -> tuple[int, int]:
    p = vq.packed
    if dev.broken or not isinstance(p, VuPackedRing):
        return 0, 0
    pos, wrap = vq.last_avail_idx, p.last_avail_wrap_counter
    in_total = out_total = seen = 0
    h = p.views.desc_h
    while seen < vq.num and is_avail_desc(h[(pos << 3) + DESC_FLAGS_H], wrap):
        r = _walk(dev, vq, pos, wrap, None, None)
        if r is None:
            return 0, 0
        _, entries, in_b, out_b = r
        in_total += in_b
        out_total += out_b
        if in_total >= max_in_bytes and out_total >= max_out_bytes:
            break
        seen += entries
        pos += entries
        if pos >= vq.num:
            pos, wrap = pos - vq.num, not wrap
    return in_total, out_total


def vu_queue_packed_rewind(dev: VuDev, vq: VuVirtq, num: int) -> bool:
    """Give back ``num`` single-entry chains (the receive path's buffers)."""
    p = vq.packed
    assert isinstance(p, VuPackedRing)
    if num > vq.inuse:
        return False
    pos = vq.last_avail_idx - num
    if pos < 0:
        pos += vq.num
        p.last_avail_wrap_counter = not p.last_avail_wrap_counter
    vq.shadow_avail_idx = vq.last_avail_idx = pos
    vq.inuse -= num
    return True


def vu_queue_packed_fill(dev: VuDev, vq: VuVirtq, elem: VuVirtqElement, length: int,
                         idx: int) -> None:
    p = vq.packed
    if dev.broken or not isinstance(p, VuPackedRing):
        return
    while len(p.used_elems) <= idx:
        p.used_elems.append(None)
        p.used_lens.append(0)
    p.used_elems[idx] = elem
    p.used_lens[idx] = length


def virtqueue_packed_fill_desc(vq: VuVirtq, p: VuPackedRing, elem: VuVirtqElement,
                               length: int, offset: int) -> None:
    head = vq.used_idx + offset
    wrap = p.used_wrap_counter
    if head >= vq.num:
        head -= vq.num
        wrap = not wrap
    h = p.views.desc_h
    fi = (head << 3) + DESC_FLAGS_H
    flags = h[fi]
    flags = flags | AVAIL_USED_F if wrap else flags & ~AVAIL_USED_F
    p.views.desc[(head << 4) + 8 : (head << 4) + 12].cast("I")[0] = length
    h[(head << 3) + 6] = elem.index
    h[fi] = flags


def vu_queue_packed_flush(dev: VuDev, vq: VuVirtq, count: int) -> None:
    """Write the used descriptors, the first one's flags last, so the driver sees the batch
    at once (``virtqueue_packed_flush``)."""
    p = vq.packed
    if dev.broken or not isinstance(p, VuPackedRing) or not count:
        return
    elems, lens = p.used_elems, p.used_lens
    first = elems[0]
    assert first is not None
    ndescs = first.ndescs
    for i in range(1, count):
        e = elems[i]
        assert e is not None
        virtqueue_packed_fill_desc(vq, p, e, lens[i], ndescs)
        ndescs += e.ndescs
    virtqueue_packed_fill_desc(vq, p, first, lens[0], 0)
    del elems[:count], lens[:count]
    vq.inuse -= ndescs
    vq.used_idx += ndescs
    if vq.used_idx >= vq.num:
        vq.used_idx -= vq.num
        p.used_wrap_counter = not p.used_wrap_counter
        vq.signalled_used_valid = False


def vring_packed_notify(dev: VuDev, vq: VuVirtq) -> bool:
    """``virtio_packed_should_notify``: the driver event's flags, or its off_wrap with
    EVENT_IDX."""
    p = vq.packed
    assert isinstance(p, VuPackedRing)
    drv = p.views.driver
    off_wrap, flags = drv[EVENT_OFF_WRAP_H], drv[EVENT_FLAGS_H]
    old = vq.signalled_used
    new = vq.signalled_used = vq.used_idx
    v = vq.signalled_used_valid
    vq.signalled_used_valid = True
    if flags == VRING_PACKED_EVENT_FLAG_DISABLE:
        return False
    if flags == VRING_PACKED_EVENT_FLAG_ENABLE:
        return True
    off = off_wrap & 0x7FFF
    if p.used_wrap_counter != bool(off_wrap >> 15):
        off -= vq.num
    return not v or vring_need_event(off & 0xFFFF, new, old)


def vu_queue_packed_set_notification(dev: VuDev, vq: VuVirtq, enable: bool) -> None:
    p = vq.packed
    vq.notification = enable
    if not isinstance(p, VuPackedRing):
        return
    ev = p.views.device
    if not enable:
        ev[EVENT_FLAGS_H] = VRING_PACKED_EVENT_FLAG_DISABLE
    elif vu_has_feature(dev, VIRTIO_RING_F_EVENT_IDX):
        ev[EVENT_OFF_WRAP_H] = vq.shadow_avail_idx | p.last_avail_wrap_counter << 15
        ev[EVENT_FLAGS_H] = VRING_PACKED_EVENT_FLAG_DESC
    else:
        ev[EVENT_FLAGS_H] = VRING_PACKED_EVENT_FLAG_ENABLE
