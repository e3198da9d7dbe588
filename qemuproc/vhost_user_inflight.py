"""Stands for vhost-user's inflight tracking (VHOST_USER_GET_INFLIGHT_FD /
VHOST_USER_SET_INFLIGHT_FD, libvhost-user's ``vu_queue_inflight_*`` and
``vu_check_queue_inflights``): what a device that died had popped and not yet completed.

The record lives in the run's ``inflight`` shared-memory segment (common/ipc.py), made by the
supervisor, so it outlives any QEMU. After the segment's 64-byte run header, each virtqueue
has a region (``VuVirtqInflight``, split ring):

    u16 version, u16 desc_num, u16 used_idx, u16 used_wrap_counter, 56 bytes reserved
    u8  inflight[desc_num]          1 while the head is popped and not yet used (split)
    u16 num[desc_num]               packed: the ring positions buffer id i took while it
                                    is popped and not yet used, else 0 (libvhost-user's
                                    DescStatePacked ``inflight``/``num``, reduced)

The device keeps it on its hot path with plain memoryview stores (qemuproc/virtio.py):

* ``virtqueue_pop``: ``inflight[head] = 1`` (vu_queue_inflight_get);
* ``virtqueue_flush``, after publishing ``used->idx``: ``inflight[id] = 0`` for each entry
  published, then ``used_idx = used->idx`` (vu_queue_inflight_post_put);
* ``virtqueue_detach_element`` (and so ``virtqueue_unpop``): ``inflight[head] = 0``.

A QEMU that dies between the ``used->idx`` store and the record's leaves ``used_idx`` behind
the ring's; ``vu_check_queue_inflights`` then clears the heads the ring published since
(libvhost-user does the same with ``last_batch_head``, one head; reading the used ring back
covers a batch). The heads still flagged were popped and never completed: the new device
must process them again (the resubmit list).

virtio-net completes in order (TX: pop, send, push, one at a time or parked in ``async_tx``;
RX: the buffers of one frame filled and flushed together), so the resubmit list, sorted as
vhost-user sorts it by pop counter, is exactly the avail ring from ``used->idx`` on. The new
device resubmits by starting ``last_avail_idx`` at ``used->idx``: it pops those heads again,
in their order, with no second pop path. The record says how many there are (the packets
that may reach the wire twice) and is checked against the avail ring.

A packed ring (``vu_check_queue_inflights_packed``) has no used index in guest RAM: the
record's ``used_idx``/``used_wrap_counter`` are the device's, stored after each used
descriptor's flags. A QEMU that died between the two left the record behind; the used
descriptors the ring shows from there (AVAIL == USED == the record's wrap counter, ids the
record has in flight) are taken as done, then ``last_avail_idx`` and its wrap counter start
at the used position, so the chains in flight, still available in the ring, are popped again.

Device counters that span QEMU's incarnations sit in bytes 32..63 of the run header.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import posix_ipc

from common.ipc import RUN_HEADER_SIZE, RunConfig, inflight_region_size
from common.vring_packed import DESC_FLAGS_H, DESC_ID_H, is_avail_desc, is_used_desc
from qemuproc.virtio import (
    VirtIODevice,
    VirtQueue,
    virtqueue_inflight_put_used,
    virtqueue_num_heads,
)

INFLIGHT_VERSION = 2
QUEUE_HEADER = 64
DEVICE_COUNTERS = struct.Struct("<II")  # at run header + 32: QEMUs started, chains resubmitted
DEVICE_COUNTERS_OFF = 32


@dataclass
class QueueRecovery:
    """What ``vu_check_queue_inflights`` found for one queue."""

    name: str
    used_idx: int
    resubmit: int
    fixed_up: int = 0
    mismatch: bool = False


class InflightRegions:
    """The mapped segment; the queues' ``inflight`` views point into it."""

    def __init__(self, cfg: RunConfig) -> None:
        shm = posix_ipc.SharedMemory(cfg.inflight)
        try:
            self._map = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        self.mem = memoryview(self._map)
        self.queue_size = cfg.queue_size
        self.num_queues = cfg.num_queues

    def region(self, n: int) -> int:
        return RUN_HEADER_SIZE + n * inflight_region_size(self.queue_size)

    def attach(self, vdev: VirtIODevice) -> None:
        """vhost_user_set_inflight_fd: each queue's record goes to its shared region."""
        for vq in vdev.vq:
            room = inflight_region_size(self.queue_size) - QUEUE_HEADER
            if vq.queue_index >= self.num_queues or vq.num_default > room:
                continue  # no region for it: keeps its private record
            off = self.region(vq.queue_index)
            size = inflight_region_size(self.queue_size)
            hdr = self.mem[off : off + 8].cast("H")
            if hdr[0] != INFLIGHT_VERSION or hdr[1] != vq.num_default:
                self.mem[off : off + size] = bytes(size)
                hdr[0], hdr[1], hdr[3] = INFLIGHT_VERSION, vq.num_default, 1
            vq.inflight = self.mem[off + QUEUE_HEADER : off + QUEUE_HEADER + vq.num_default]
            num_off = off + QUEUE_HEADER + ((self.queue_size + 63) & ~63)
            vq.inflight_num = self.mem[num_off : num_off + 2 * vq.num_default].cast("H")
            vq.inflight_used = hdr[2:4]

    def counters(self) -> tuple[int, int]:
        return DEVICE_COUNTERS.unpack_from(self.mem, DEVICE_COUNTERS_OFF)

    def set_counters(self, incarnation: int, resubmitted: int) -> None:
        DEVICE_COUNTERS.pack_into(self.mem, DEVICE_COUNTERS_OFF, incarnation, resubmitted)


def vu_check_queue_inflights(vq: VirtQueue) -> QueueRecovery:
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


def vu_check_queue_inflights_packed(vq: VirtQueue) -> QueueRecovery:
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
