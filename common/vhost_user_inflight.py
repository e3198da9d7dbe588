"""Stands for libvhost-user.h's inflight area (``VuVirtqInflight``, ``VuDescStateSplit``):
the layout of what VHOST_USER_GET_INFLIGHT_FD hands the front-end, one region per queue,
each 64-byte aligned:

    u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx
    VuDescStateSplit desc[desc_num]: u8 inflight, u8 padding[5], u16 next, u64 counter

The front-end keeps the memfd and gives it back (SET_INFLIGHT_FD) to the next backend
without reading it; the backend that wrote it is the one that reads it.
"""

from __future__ import annotations

import mmap
import struct

INFLIGHT_ALIGNMENT = 64
INFLIGHT_VERSION = 1
INFLIGHT_HDR = struct.Struct("<QHHHH")
"""features, version, desc_num, last_batch_head, used_idx."""
DESC_STATE_SPLIT = struct.Struct("<B5xHQ")
"""inflight, padding, next, counter."""
_VERSION_OFF, _DESC_NUM_OFF, _LAST_BATCH_OFF, _USED_IDX_OFF = 8, 10, 12, 14


def vu_inflight_queue_size(queue_size: int) -> int:
    """Bytes of one queue's region (``vu_inflight_queue_size``)."""
    n = DESC_STATE_SPLIT.size * queue_size + 2
    return (n + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


class VuVirtqInflight:
    """One queue's region of the mapped area; sets ``desc_num`` as SET_INFLIGHT_FD does."""

    def __init__(self, area: mmap.mmap, offset: int, desc_num: int) -> None:
        self.mem = memoryview(area)[offset : offset + vu_inflight_queue_size(desc_num)]
        self.h = self.mem[: INFLIGHT_HDR.size].cast("H")
        self.desc_num = desc_num
        self.h[_DESC_NUM_OFF // 2] = desc_num

    def release(self) -> None:
        self.h.release()
        self.mem.release()

    @property
    def version(self) -> int:
        return self.h[_VERSION_OFF // 2]

    @version.setter
    def version(self, v: int) -> None:
        self.h[_VERSION_OFF // 2] = v

    @property
    def last_batch_head(self) -> int:
        return self.h[_LAST_BATCH_OFF // 2]

    @last_batch_head.setter
    def last_batch_head(self, v: int) -> None:
        self.h[_LAST_BATCH_OFF // 2] = v

    @property
    def used_idx(self) -> int:
        return self.h[_USED_IDX_OFF // 2]

    @used_idx.setter
    def used_idx(self, v: int) -> None:
        self.h[_USED_IDX_OFF // 2] = v & 0xFFFF

    def _off(self, i: int) -> int:
        return INFLIGHT_HDR.size + i * DESC_STATE_SPLIT.size

    def inflight(self, i: int) -> int:
        return self.mem[self._off(i)]

    def counter(self, i: int) -> int:
        return int.from_bytes(self.mem[self._off(i) + 8 : self._off(i) + 16], "little")

    def set_desc(self, i: int, inflight: int, counter: int) -> None:
        off = self._off(i)
        self.mem[off + 8 : off + 16] = counter.to_bytes(8, "little")
        self.mem[off] = inflight

    def clear_desc(self, i: int) -> None:
        self.mem[self._off(i)] = 0
