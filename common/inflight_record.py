"""The replica's inflight record of QEMU's own virtqueues: the layout of the run's
``inflight`` shared-memory segment (common/ipc.py), made by the supervisor so that it
outlives any QEMU. A restarted QEMU (qemuproc/cpr.py) reads it as a vhost-user backend reads
the inflight area of VHOST_USER_GET/SET_INFLIGHT_FD (libvhost-user's is
common/vhost_user_inflight.py): what the QEMU that died had popped and not yet completed.

After the segment's 64-byte run header, each virtqueue has a region
(``inflight_region_size``):

    u16 version, u16 desc_num, u16 used_idx, u16 used_wrap_counter, 56 bytes reserved
    u8  inflight[desc_num]          1 while the head is popped and not yet used (split)
    u16 num[desc_num]               packed: the ring positions buffer id i took while it
                                    is popped and not yet used, else 0

Device counters that span QEMU's incarnations sit in bytes 32..63 of the run header.
"""

from __future__ import annotations

import mmap
import struct

import posix_ipc

from common.ipc import RUN_HEADER_SIZE, RunConfig, inflight_region_size

INFLIGHT_VERSION = 2
QUEUE_HEADER = 64
DEVICE_COUNTERS = struct.Struct("<II")  # at run header + 32: QEMUs started, chains resubmitted
DEVICE_COUNTERS_OFF = 32


class InflightRecord:
    """The mapped segment and each queue's region in it."""

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

    def queue(self, n: int, num: int) -> tuple[memoryview, memoryview, memoryview] | None:
        """Queue ``n``'s (inflight u8[num], num u16[num], [used_idx, used_wrap_counter]),
        the region reset when it was another size's; None when it has no region."""
        size = inflight_region_size(self.queue_size)
        if n >= self.num_queues or num > size - QUEUE_HEADER:
            return None
        off = self.region(n)
        hdr = self.mem[off : off + 8].cast("H")
        if hdr[0] != INFLIGHT_VERSION or hdr[1] != num:
            self.mem[off : off + size] = bytes(size)
            hdr[0], hdr[1], hdr[3] = INFLIGHT_VERSION, num, 1
        inflight = self.mem[off + QUEUE_HEADER : off + QUEUE_HEADER + num]
        num_off = off + QUEUE_HEADER + ((self.queue_size + 63) & ~63)
        return inflight, self.mem[num_off : num_off + 2 * num].cast("H"), hdr[2:4]

    def counters(self) -> tuple[int, int]:
        return DEVICE_COUNTERS.unpack_from(self.mem, DEVICE_COUNTERS_OFF)

    def set_counters(self, incarnation: int, resubmitted: int) -> None:
        DEVICE_COUNTERS.pack_into(self.mem, DEVICE_COUNTERS_OFF, incarnation, resubmitted)
