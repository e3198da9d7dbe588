"""A restarted QEMU's recovery of its virtqueues from the replica's inflight record
(common/inflight_record.py), as libvhost-user's ``vu_check_queue_inflights`` recovers a
backend's (vhostuserproc/libvhost_user.py): what a device that died had popped and not yet
completed.

The device keeps it on its hot path with plain memoryview stores (qemuproc/virtio.py):

* ``virtqueue_pop``: ``inflight[head] = 1`` (libvhost-user's vu_queue_inflight_get);
* ``virtqueue_flush``, after publishing ``used->idx``: ``inflight[id] = 0`` for each entry
  published, then ``used_idx = used->idx`` (libvhost-user's vu_queue_inflight_post_put);
* ``virtqueue_detach_element`` (and so ``virtqueue_unpop``): ``inflight[head] = 0``.

A QEMU that dies between the ``used->idx`` store and the record's leaves ``used_idx`` behind
the ring's; ``virtio_queue_check_inflights`` then clears the heads the ring published since
(libvhost-user does the same with ``last_batch_head``, one head; reading the used ring back
covers a batch). The heads still flagged were popped and never completed: the new device
must process them again (the resubmit list).

virtio-net completes in order (TX: pop, send, push, one at a time or parked in ``async_tx``;
RX: the buffers of one frame filled and flushed together), so the resubmit list, sorted as
vhost-user sorts it by pop counter, is exactly the avail ring from ``used->idx`` on. The new
device resubmits by starting ``last_avail_idx`` at ``used->idx``: it pops those heads again,
in their order, with no second pop path. The record says how many there are (the packets
that may reach the wire twice) and is checked against the avail ring.

A packed ring (``virtio_queue_packed_check_inflights``) has no used index in guest RAM: the
record's ``used_idx``/``used_wrap_counter`` are the device's, stored after each used
descriptor's flags. A QEMU that died between the two left the record behind; the used
descriptors the ring shows from there (AVAIL == USED == the record's wrap counter, ids the
record has in flight) are taken as done, then ``last_avail_idx`` and its wrap counter start
at the used position, so the chains in flight, still available in the ring, are popped again.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.inflight_record import InflightRecord
from common.vring_packed import DESC_FLAGS_H, DESC_ID_H, is_avail_desc, is_used_desc
from qemuproc.virtio import (
    VirtIODevice,
    VirtQueue,
    virtqueue_inflight_put_used,
    virtqueue_num_heads,
)


@dataclass
class QueueRecovery:
    """What ``virtio_queue_check_inflights`` found for one queue."""

    name: str
    used_idx: int
    resubmit: int
    fixed_up: int = 0
    mismatch: bool = False


class InflightRegions(InflightRecord):
    """The record with each queue's views pointed into it (vhost_user_set_inflight_fd)."""

    def attach(self, vdev: VirtIODevice) -> None:
        for vq in vdev.vq:
            views = self.queue(vq.queue_index, vq.num_default)
            if views is None:
                continue  # no region for it: keeps its private record
            vq.inflight, vq.inflight_num, vq.inflight_used = views


def virtio_queue_check_inflights(vq: VirtQueue) -> QueueRecovery:
    """Recover a queue of a device that died: its indices from the rings and the record.

    Leaves ``last_avail_idx`` at ``used->idx`` so the heads in flight are popped again; the
    flags stay set until that pop sets them again (a second death meanwhile finds them).
    """
    v = vq.views
    assert v is not None
    num = vq.num
    used = v.used_hdr[1]
    rec = QueueRecovery(vq.name, used, 0)
    start = vq.inflight_used[0]
    # published, not yet cleared in the record
    rec.fixed_up = min((used - start) & 0xFFFF, num + 1)
    virtqueue_inflight_put_used(vq, start, rec.fixed_up)
    vq.inflight_used[0] = used
    inflight = vq.inflight
    heads = [h for h in range(num) if inflight[h]]
    rec.resubmit = len(heads)
    pending = virtqueue_num_heads(vq, used)
    if pending < 0:
        return rec
    ring = sorted(v.avail[2 + (used + j) % num] for j in range(min(rec.resubmit, pending)))
    rec.mismatch = ring != heads
    vq.used_idx = vq.last_avail_idx = vq.shadow_avail_idx = used
    vq.inuse = 0
    vq.signalled_used_valid = False
    return rec


def virtio_queue_packed_check_inflights(vq: VirtQueue) -> QueueRecovery:
    """Recover a packed queue of a device that died: its positions and wrap counters from
    the record (moved past the used descriptors the ring shows it wrote last), the chains
    in flight to pop again; checked against the available heads the ring holds from there."""
    p = vq.packed
    assert p is not None
    num = vq.num
    h = p.desc_h
    counts = vq.inflight_num
    used, wrap = vq.inflight_used[0] % num, bool(vq.inflight_used[1])
    rec = QueueRecovery(vq.name, used, 0)
    while rec.fixed_up <= num and is_used_desc(h[(used << 3) + DESC_FLAGS_H], wrap):
        buf_id = h[(used << 3) + DESC_ID_H]
        n = counts[buf_id] if buf_id < num else 0
        if not n:
            break
        counts[buf_id] = 0
        used += n
        if used >= num:
            used -= num
            wrap = not wrap
        rec.fixed_up += 1
    vq.inflight_used[0], vq.inflight_used[1] = used, wrap
    heads = sorted(i for i in range(num) if counts[i])
    rec.resubmit = len(heads)
    ids, pos, w = [], used, wrap
    for _ in range(rec.resubmit):
        if not is_avail_desc(h[(pos << 3) + DESC_FLAGS_H], w):
            break
        buf_id = h[(pos << 3) + DESC_ID_H]
        ids.append(buf_id)
        pos += counts[buf_id] if buf_id < num and counts[buf_id] else 1
        if pos >= num:
            pos -= num
            w = not w
    rec.mismatch = sorted(ids) != heads
    rec.used_idx = used
    vq.used_idx = vq.last_avail_idx = vq.shadow_avail_idx = used
    vq.used_wrap_counter = vq.last_avail_wrap_counter = vq.shadow_avail_wrap_counter = wrap
    vq.inuse = 0
    vq.signalled_used_valid = False
    return rec
