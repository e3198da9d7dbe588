"""The tests' rig around ``common.vring_mock``: a guest-RAM segment and a semaphore of a
test's own, and the smallest device side for a mock ring: a ``VirtIODevice`` with one
``VirtQueue`` placed at the mock's ring, whose DMA is the same ``GuestMemory``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from common.guest_memory import GuestMemory
from common.notifier import EventNotifier
from common.virtio_abi import (
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_RING_PACKED,
    VIRTIO_ID_NET,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from common.vring_mock import MockSplitQueue
from common.vring_packed import PackedLayout
from qemuproc.virtio import (
    VirtIODevice,
    VirtQueue,
    virtio_add_queue,
    virtio_queue_ready,
    virtio_queue_set_addr,
    virtio_queue_set_rings,
    virtio_set_features,
)

TEST_PREFIX = "vnrtest."
"""Names of the IPC objects tests make (not ``vnr.``: a run's cleanup never touches them)."""

PAGE = 4096


def ipc_name(what: str) -> str:
    """A POSIX IPC name unique to this process and call."""
    return f"/{TEST_PREFIX}{os.getpid()}.{secrets.token_hex(4)}.{what}"


@contextmanager
def guest_memory(size: int = 1 << 20) -> Iterator[GuestMemory]:
    """A fresh guest-RAM segment, unlinked (and unmapped) on exit."""
    name = ipc_name("ram")
    mem = GuestMemory(name, size, create=True)
    try:
        yield mem
    finally:
        mem.close()
        GuestMemory.unlink(name)


@contextmanager
def event_notifier() -> Iterator[EventNotifier]:
    """A fresh named semaphore (an eventfd stand-in), unlinked on exit."""
    name = ipc_name("sem")
    notifier = EventNotifier(name, create=True)
    try:
        yield notifier
    finally:
        notifier.close()
        EventNotifier.unlink(name)


def make_device(mem: GuestMemory, num: int, base: int = PAGE, *, event_idx: bool = False,
                notify_on_empty: bool = False,
                handle_output: Callable[[VirtIODevice, VirtQueue], None] | None = None,
                align: int = PAGE) -> tuple[VirtIODevice, VirtQueue]:
    """A device with one queue of ``num`` placed at ``base`` (as a legacy QUEUE_PFN write
    does), features negotiated as asked, DMA through ``mem``."""
    vdev = VirtIODevice("virtio-net", VIRTIO_ID_NET, 0, mem)
    vq = virtio_add_queue(vdev, num, handle_output or (lambda d, q: None), "TX(q1)")
    features = (int(event_idx) << VIRTIO_RING_F_EVENT_IDX) | (
        int(notify_on_empty) << VIRTIO_F_NOTIFY_ON_EMPTY)
    vdev.host_features = features
    if virtio_set_features(vdev, features) != 0:
        raise RuntimeError("feature negotiation refused")
    vq.align = align
    virtio_queue_set_addr(vdev, vq.queue_index, base)
    if not virtio_queue_ready(vq):
        raise RuntimeError(f"queue at 0x{base:x} refused: {vdev.errors}")
    return vdev, vq


def device_for(mock: MockSplitQueue, *, event_idx: bool = False,
               notify_on_empty: bool = False) -> tuple[VirtIODevice, VirtQueue]:
    """``make_device`` placed at ``mock``'s ring."""
    return make_device(mock.mem, mock.num, mock.layout.base, event_idx=event_idx,
                       notify_on_empty=notify_on_empty, align=mock.layout.align)


def release_device(vq: VirtQueue) -> None:
    """Drop the device's mapping of the ring (before the segment is unmapped)."""
    if vq.views is not None:
        vq.views.release()
        vq.views = None


def restore_device_indices(vq: VirtQueue, idx: int) -> None:
    """Continue a queue whose avail and used indices both stand at ``idx`` (as after a
    migration); the used index in the ring is stored too."""
    vq.last_avail_idx = vq.shadow_avail_idx = vq.used_idx = vq.signalled_used = idx & 0xFFFF
    assert vq.views is not None
    vq.views.used_hdr[1] = idx & 0xFFFF


def make_packed_device(mem: GuestMemory, num: int, layout: PackedLayout, *,
                       event_idx: bool = False, indirect: bool = False,
                       handle_output: Callable[[VirtIODevice, VirtQueue], None] | None = None
                       ) -> tuple[VirtIODevice, VirtQueue]:
    """A device with one queue whose three areas are ``layout``'s (as a modern transport's
    queue_desc/driver/device writes place them), VIRTIO_F_RING_PACKED negotiated."""
    vdev = VirtIODevice("virtio-net", VIRTIO_ID_NET, 0, mem)
    vq = virtio_add_queue(vdev, num, handle_output or (lambda d, q: None), "TX(q1)")
    features = (1 << VIRTIO_F_RING_PACKED) | (int(event_idx) << VIRTIO_RING_F_EVENT_IDX) | (
        int(indirect) << VIRTIO_RING_F_INDIRECT_DESC)
    vdev.host_features = features
    if virtio_set_features(vdev, features) != 0:
        raise RuntimeError("feature negotiation refused")
    virtio_queue_set_rings(vdev, vq.queue_index, layout.desc, layout.driver, layout.device)
    if not virtio_queue_ready(vq):
        raise RuntimeError(f"packed queue refused: {vdev.errors}")
    return vdev, vq


def release_packed_device(vq: VirtQueue) -> None:
    if vq.packed is not None:
        vq.packed.release()
        vq.packed = None
