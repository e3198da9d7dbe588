"""The packed ring (VIRTIO_F_RING_PACKED) between the guest's real ``guestproc.virtio_ring``
and QEMU's real ``qemuproc.virtio``: in two processes over one POSIX shared-memory segment
(wrap counters across many wraps, indirect tables, out-of-order completion), and in one
process for event suppression and for rings written by ``common.vring_mock.MockPackedQueue`` that no
real driver would write.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
from ringmock import (
    PAGE,
    event_notifier,
    guest_memory,
    make_packed_device,
    release_packed_device,
)
from two_process import run_driver_and_device

from common.guest_memory import GuestMemory
from common.notifier import EventNotifier
from common.vring import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from common.vring_mock import MockPackedQueue
from common.vring_packed import (
    PACKED_DESC,
    VRING_PACKED_EVENT_F_WRAP_CTR,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    layout_at,
    vring_packed_size,
)
from guestproc.virtio_ring import (
    BadRing,
    Virtqueue,
    virtqueue_add_outbuf,
    virtqueue_add_sgs,
    virtqueue_detach_unused_buf,
    virtqueue_disable_cb,
    virtqueue_enable_cb_delayed,
    virtqueue_enable_cb_prepare,
    virtqueue_get_buf,
    virtqueue_kick_prepare,
    virtqueue_notify,
    virtqueue_poll,
    vring_create_virtqueue,
    vring_indirect_size,
)
from qemuproc.virtio import (
    virtio_queue_empty,
    virtio_queue_set_notification,
    virtio_should_notify,
    virtqueue_fill,
    virtqueue_flush,
    virtqueue_get_avail_bytes,
    virtqueue_pop,
    virtqueue_push,
)

pytestmark = pytest.mark.usefixtures("no_leftovers")

NUM = 64
RING_BASE = PAGE
MEM_SIZE = 1 << 20
SLOT = 256
KICK_WAIT_S = 2.0
NO_PROGRESS_S = 20.0
WRAP = 1 << VRING_PACKED_EVENT_F_WRAP_CTR


def indirect_base(num: int = NUM) -> int:
    return (RING_BASE + vring_packed_size(num) + PAGE - 1) & ~(PAGE - 1)


def data_base(num: int = NUM) -> int:
    return (indirect_base(num) + vring_indirect_size(num) + PAGE - 1) & ~(PAGE - 1)


def payload(seq: int) -> bytes:
    length = 16 + (seq * 37) % 200
    return seq.to_bytes(8, "big") + bytes((seq * 7 + i) & 0xFF for i in range(length - 8))


def driver_queue(mem: GuestMemory, event_idx: bool, indirect: bool, notify: Any = None,
                 callback: Any = None, num: int = NUM) -> Virtqueue:
    return vring_create_virtqueue(1, num, RING_BASE, mem.ram, None,
                                  notify or (lambda q: True), callback, "output.0", event_idx,
                                  indirect_base=indirect_base(num) if indirect else 0,
                                  packed=True)


# -- two processes ----------------------------------------------------------------------------


def driver_main(shm: str, kick_name: str, n: int, event_idx: bool, indirect: bool, seed: int,
                conn: Connection) -> None:
    """The guest: add ``n`` out-buffers of one to three descriptors in batches, kick when the
    device's event structure asks for it, reclaim in whatever order the device used them."""
    out: dict[str, Any] = {"added": [], "completed": [], "error": None}
    mem = GuestMemory(shm)
    kick = EventNotifier(kick_name)

    def notify(vq: Virtqueue) -> bool:
        kick.set()
        return True

    vq = driver_queue(mem, event_idx, indirect, notify)
    conn.send("ready")
    rnd = random.Random(seed)
    free_slots = list(range(NUM))
    pending: dict[int, int] = {}
    batch, batch_len = 0, 1

    def kick_if_needed() -> None:
        nonlocal batch, batch_len
        if vq.num_added and virtqueue_kick_prepare(vq):
            virtqueue_notify(vq)
        batch, batch_len = 0, rnd.randint(1, 8)

    def reclaim() -> int:
        got = 0
        while (r := virtqueue_get_buf(vq)) is not None:
            (seq, slot), length = r
            if length != len(payload(seq)):
                raise AssertionError(f"buffer {seq}: len {length}")
            del pending[seq]
            out["completed"].append(seq)
            free_slots.append(slot)
            got += 1
        return got

    try:
        last_progress = time.monotonic()
        wraps = 0
        for seq in range(n):
            data = payload(seq)
            ndesc = rnd.choice((1, 1, 2, 3))
            while vq.num_free < (1 if indirect and ndesc > 1 else ndesc) or not free_slots:
                kick_if_needed()
                if reclaim():
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > NO_PROGRESS_S:
                    raise TimeoutError(f"the device used nothing for {NO_PROGRESS_S} s")
                else:
                    time.sleep(0.0002)
            slot = free_slots.pop()
            addr = data_base() + slot * SLOT
            mem.ram[addr : addr + len(data)] = data
            cuts = sorted(rnd.sample(range(1, len(data)), ndesc - 1))
            bounds = [0, *cuts, len(data)]
            sgs = [(addr + a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
            wrap_before = vq.avail_wrap_counter
            if virtqueue_add_outbuf(vq, sgs, (seq, slot)) != 0:
                raise AssertionError("virtqueue_add_outbuf failed")
            wraps += vq.avail_wrap_counter != wrap_before
            pending[seq] = slot
            out["added"].append(seq)
            batch += 1
            if batch >= batch_len:
                kick_if_needed()
        kick_if_needed()
        last_progress = time.monotonic()
        while pending:
            if reclaim():
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > NO_PROGRESS_S:
                raise TimeoutError(f"{len(pending)} buffers never came back")
            else:
                time.sleep(0.0002)
        out.update(num_free=vq.num_free, wraps=wraps, indirect_adds=vq.indirect_adds,
                   kicks=vq.kicks)
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails with it
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.send(out)
        vq.v.release()
        kick.close()
        mem.close()


def device_main(shm: str, kick_name: str, n: int, event_idx: bool, indirect: bool, seed: int,
                conn: Connection) -> None:
    """QEMU: on each kick pop every available chain with notifications off, then hand them
    back in a shuffled order (one virtqueue_push each, or one fill/flush batch), re-enable
    and look again. Reports the order it completed them in, and any lost kick."""
    out: dict[str, Any] = {"completed": [], "lost_kicks": 0, "errors": [], "batches": 0}
    mem = GuestMemory(shm)
    kick = EventNotifier(kick_name)
    vdev, vq = make_packed_device(mem, NUM, layout_at(RING_BASE, NUM), event_idx=event_idx,
                                  indirect=indirect)
    rnd = random.Random(seed)
    done = out["completed"]
    try:
        last_progress = time.monotonic()
        while not vdev.broken and len(done) < n:
            while True:
                virtio_queue_set_notification(vq, False)
                popped = []
                while (elem := virtqueue_pop(vq)) is not None:
                    data = b"".join(bytes(sg) for sg in elem.out_sg)
                    popped.append((int.from_bytes(data[:8], "big"), elem, len(data)))
                rnd.shuffle(popped)
                if len(popped) > 1 and all(e.ndescs == 1 for _, e, _ in popped):
                    for k, (_, elem, length) in enumerate(popped):
                        virtqueue_fill(vq, elem, length, k)
                    virtqueue_flush(vq, len(popped))
                    out["batches"] += 1
                else:
                    for _, elem, length in popped:
                        virtqueue_push(vq, elem, length)
                done.extend(seq for seq, _, _ in popped)
                if popped:
                    last_progress = time.monotonic()
                virtio_queue_set_notification(vq, True)
                if vdev.broken or virtio_queue_empty(vq):
                    break
            if len(done) >= n:
                break
            if kick.wait(KICK_WAIT_S):
                continue
            if not virtio_queue_empty(vq):
                out["lost_kicks"] += 1
            elif time.monotonic() - last_progress > NO_PROGRESS_S:
                break
        out.update(inuse=vq.inuse, last_avail_idx=vq.last_avail_idx, used_idx=vq.used_idx,
                   wrap=(vq.last_avail_wrap_counter, vq.used_wrap_counter))
    finally:
        out["errors"] = vdev.errors
        conn.send(out)
        release_packed_device(vq)
        kick.close()
        mem.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("event_idx", "indirect"), [(True, False), (False, True)],
                         ids=["event_idx", "indirect"])
def test_packed_ring_two_processes_out_of_order(event_idx: bool, indirect: bool) -> None:
    """1500 buffers through a 64-entry packed ring (dozens of wraps of both wrap counters):
    the device completes each batch in a shuffled order; the driver gets every buffer back
    exactly once, in exactly the order the device completed them, with its length, and ends
    with every descriptor free; no kick the device needed was suppressed."""
    n = 1500
    with guest_memory(MEM_SIZE) as mem, event_notifier() as kick:
        args = (mem.name, kick.name, n, event_idx, indirect, 77)
        drv, dev = run_driver_and_device(driver_main, args, device_main, args)
    assert drv["error"] is None, drv["error"]
    assert dev["errors"] == []
    assert sorted(drv["completed"]) == list(range(n))
    assert drv["completed"] == dev["completed"]
    assert drv["completed"] != drv["added"], "the device never completed out of order"
    assert drv["num_free"] == NUM and dev["inuse"] == 0
    assert drv["wraps"] >= 10
    assert dev["last_avail_idx"] == dev["used_idx"]
    assert dev["lost_kicks"] == 0
    if indirect:
        assert drv["indirect_adds"] > 0
    else:
        assert dev["batches"] > 0


# -- one process: event suppression ------------------------------------------------------------


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with guest_memory(MEM_SIZE) as m:
        yield m


@pytest.mark.timeout(30)
def test_device_disable_enable_suppresses_kicks(mem: GuestMemory) -> None:
    """Without EVENT_IDX the device's event structure is DISABLE while it has notifications
    off (no kick) and ENABLE once they are on again (kick), across several wraps."""
    vdev, vq = make_packed_device(mem, 8, layout_at(RING_BASE, 8))
    drv = driver_queue(mem, False, False, num=8)
    try:
        for k in range(40):
            off = k % 3 == 0
            virtio_queue_set_notification(vq, not off)
            assert drv.v.device[1] == (VRING_PACKED_EVENT_FLAG_DISABLE if off
                                       else VRING_PACKED_EVENT_FLAG_ENABLE)
            assert virtqueue_add_outbuf(drv, [(data_base(8), 60)], k) == 0
            assert virtqueue_kick_prepare(drv) is (not off)
            elem = virtqueue_pop(vq)
            assert elem is not None
            virtqueue_push(vq, elem, 0)
            assert virtqueue_get_buf(drv) == (k, 0)
        assert vq.used_wrap_counter is False and drv.avail_wrap_counter is False  # 40 = 5 wraps
    finally:
        drv.v.release()
        release_packed_device(vq)


@pytest.mark.timeout(30)
def test_event_idx_desc_kicks_at_the_device_offset(mem: GuestMemory) -> None:
    """With EVENT_IDX the device asks (DESC) to be kicked at shadow_avail_idx in its wrap
    and does not move that offset as it pops: the buffer added at the offset is kicked, the
    ones after it are not until the device re-arms — across several wraps of both sides."""
    vdev, vq = make_packed_device(mem, 8, layout_at(RING_BASE, 8), event_idx=True)
    drv = driver_queue(mem, True, False, num=8)
    try:
        kicks = []
        for k in range(30):
            if k % 4 == 0:
                virtio_queue_set_notification(vq, True)
                off_wrap, flags = drv.v.device[0], drv.v.device[1]
                assert flags == VRING_PACKED_EVENT_FLAG_DESC
                assert off_wrap == vq.shadow_avail_idx | (vq.shadow_avail_wrap_counter << 15)
            assert virtqueue_add_outbuf(drv, [(data_base(8), 60)], k) == 0
            kicks.append(virtqueue_kick_prepare(drv))
            elem = virtqueue_pop(vq)
            assert elem is not None
            virtqueue_push(vq, elem, 0)
            assert virtqueue_get_buf(drv) == (k, 0)
        assert kicks == [k % 4 == 0 for k in range(30)]
    finally:
        drv.v.release()
        release_packed_device(vq)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("event_idx", [False, True], ids=["no_event_idx", "event_idx"])
def test_driver_event_suppresses_interrupts(mem: GuestMemory, event_idx: bool) -> None:
    """virtqueue_disable_cb writes DISABLE: QEMU's should_notify says no; enable_cb_prepare
    writes ENABLE (or DESC at last_used): it says yes; with EVENT_IDX,
    virtqueue_enable_cb_delayed asks for exactly one interrupt, at the push that uses the
    descriptor 3/4 of the outstanding ones on — in rounds that cross the wrap, where QEMU
    also signals once at the push that wraps the used index (virtqueue_packed_flush forgets
    the last signalled position there)."""
    num = 16
    vdev, vq = make_packed_device(mem, num, layout_at(RING_BASE, num), event_idx=event_idx)
    drv = driver_queue(mem, event_idx, False, callback=lambda q: None, num=num)
    try:
        virtqueue_disable_cb(drv)
        assert drv.v.driver[1] == VRING_PACKED_EVENT_FLAG_DISABLE
        assert virtqueue_add_outbuf(drv, [(data_base(num), 60)], "w") == 0
        elem = virtqueue_pop(vq)
        assert elem is not None
        virtqueue_push(vq, elem, 0)
        assert virtio_should_notify(vdev, vq) is False
        last = virtqueue_enable_cb_prepare(drv)
        assert drv.v.driver[1] == (VRING_PACKED_EVENT_FLAG_DESC if event_idx
                                   else VRING_PACKED_EVENT_FLAG_ENABLE)
        assert virtqueue_poll(drv, last) is True
        # with EVENT_IDX the used descriptor was already accounted while interrupts were off
        assert virtio_should_notify(vdev, vq) is (not event_idx)
        assert virtqueue_get_buf(drv) == ("w", 0)
        if not event_idx:
            return
        for pending in (4, 9, 12, 16, 7, 13):
            for i in range(pending):
                assert virtqueue_add_outbuf(drv, [(data_base(num) + i * 64, 60)], i) == 0
            virtqueue_disable_cb(drv)
            assert virtqueue_enable_cb_delayed(drv) is True
            bufs = pending * 3 // 4
            wrap = num - vq.used_idx  # the push whose flush wraps the used index
            notified = []
            for k in range(pending):
                elem = virtqueue_pop(vq)
                assert elem is not None
                virtqueue_push(vq, elem, 0)
                if virtio_should_notify(vdev, vq):
                    notified.append(k + 1)
            assert notified == sorted({bufs + 1} | ({wrap} if wrap <= pending else set())), \
                (pending, notified)
            assert [virtqueue_get_buf(drv) for _ in range(pending)] == [
                (i, 0) for i in range(pending)]
    finally:
        drv.v.release()
        release_packed_device(vq)


# -- one process: what the device does with rings no real driver writes -------------------------


@pytest.fixture
def ring(mem: GuestMemory) -> Iterator[MockPackedQueue]:
    mock = MockPackedQueue(mem, 16)
    try:
        yield mock
    finally:
        mock.release()


@pytest.mark.timeout(30)
def test_device_pops_mock_chains_in_ring_order(ring: MockPackedQueue) -> None:
    """A direct chain and an indirect one written by the mock come out of virtqueue_pop
    mapped exactly, with the buffer id the driver chose; the used descriptors land at the
    ring positions the chains took (3 and 1), id and len first, AVAIL == USED == 1."""
    vdev, vq = make_packed_device(ring.mem, 16, ring.layout, indirect=True)
    a = ring.alloc(64)
    ring.mem.dma_memory_write(a, b"A" * 64)
    ring.offer([(a, 10, 0), (a + 10, 20, 0), (a + 30, 34, VRING_DESC_F_WRITE)], buf_id=9)
    table = ring.alloc(32)
    PACKED_DESC.pack_into(ring.mem.ram, table, a, 5, 0, 0)
    PACKED_DESC.pack_into(ring.mem.ram, table + 16, a + 5, 7, 0, VRING_DESC_F_WRITE)
    ring.offer([(table, 32, VRING_DESC_F_INDIRECT)], buf_id=4)
    e1 = virtqueue_pop(vq)
    e2 = virtqueue_pop(vq)
    assert virtqueue_pop(vq) is None
    assert e1 is not None and e2 is not None
    assert (e1.index, e1.ndescs, [bytes(s) for s in e1.out_sg], [len(s) for s in e1.in_sg]) == (
        9, 3, [b"A" * 10, b"A" * 20], [34])
    assert (e2.index, e2.ndescs, [len(s) for s in e2.out_sg], [len(s) for s in e2.in_sg]) == (
        4, 1, [5], [7])
    virtqueue_push(vq, e2, 7)
    virtqueue_push(vq, e1, 34)
    assert ring.used_desc(0) == (4, 7, 0x8080)
    assert ring.used_desc(1) == (9, 34, 0x8080)
    assert (vq.used_idx, vq.inuse, vq.used_wrap_counter) == (4, 0, True)
    assert vdev.errors == []
    release_packed_device(vq)


HOSTILE = [
    ("zero_length", "virtio: zero sized buffers are not allowed"),
    ("outside_ram", "virtio: bogus descriptor or out of resources"),
    ("loop", "Looped descriptor"),
    ("write_then_read", "Incorrect order for descriptors"),
    ("indirect_size", "Invalid size for indirect buffer table"),
    ("indirect_outside", "Cannot map indirect buffer"),
    ("indirect_empty", "virtio: zero sized buffers are not allowed"),
    ("indirect_huge", "virtio: too many write descriptors in indirect table"),
    ("size_exceeded", "Virtqueue size exceeded"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("hostile", "message"), HOSTILE, ids=[h for h, _ in HOSTILE])
def test_device_refuses_hostile_packed_rings(ring: MockPackedQueue, hostile: str,
                                             message: str) -> None:
    """Each way a guest can lie in a packed ring ends in virtio_error with QEMU's message
    (device broken, nothing more popped, no used descriptor written), never in an exception
    or a mapping outside guest RAM."""
    vdev, vq = make_packed_device(ring.mem, 16, ring.layout, indirect=True)
    a = ring.alloc(64)
    size = ring.mem.size
    if hostile == "zero_length":
        ring.offer([(a, 0, 0)])
    elif hostile == "outside_ram":
        ring.offer([(size - 8, 64, 0)])
    elif hostile == "loop":
        for i in range(16):
            ring.write_desc(i, a, 64, 0, VRING_DESC_F_NEXT | ring.avail_flags())
    elif hostile == "write_then_read":
        ring.offer([(a, 32, VRING_DESC_F_WRITE), (a + 32, 32, 0)])
    elif hostile == "indirect_size":
        ring.offer([(a, 20, VRING_DESC_F_INDIRECT)])
    elif hostile == "indirect_outside":
        ring.offer([(size - 16, 64, VRING_DESC_F_INDIRECT)])
    elif hostile == "indirect_empty":
        ring.offer([(a, 0, VRING_DESC_F_INDIRECT)])
    elif hostile == "indirect_huge":
        entries = 1100
        table = ring.alloc(entries * 16)
        for k in range(entries):
            PACKED_DESC.pack_into(ring.mem.ram, table + k * 16, a, 1, 0, 0)
        ring.offer([(table, entries * 16, VRING_DESC_F_INDIRECT)])
    elif hostile == "size_exceeded":
        for _ in range(16):
            ring.offer([(a, 64, 0)])
        for _ in range(16):
            assert virtqueue_pop(vq) is not None
        ring.offer([(a, 64, 0)])  # slot 0 again, available in the next wrap
    before = bytes(ring.views.desc)
    assert virtqueue_pop(vq) is None
    assert vdev.broken
    assert vdev.errors and vdev.errors[0] == message, vdev.errors
    assert virtqueue_pop(vq) is None
    assert bytes(ring.views.desc) == before
    release_packed_device(vq)


@pytest.mark.timeout(30)
def test_avail_bytes_refuses_a_looped_ring(ring: MockPackedQueue) -> None:
    vdev, vq = make_packed_device(ring.mem, 16, ring.layout)
    a = ring.alloc(64)
    ring.offer([(a, 64, VRING_DESC_F_WRITE)])
    assert virtqueue_get_avail_bytes(vq, 10**9, 0) == (64, 0)
    for i in range(16):
        ring.write_desc(i, a, 64, 0, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | ring.avail_flags())
    assert virtqueue_get_avail_bytes(vq, 10**9, 0) == (0, 0)
    assert vdev.errors == ["Looped descriptor"]
    release_packed_device(vq)


@pytest.mark.timeout(30)
def test_driver_refuses_a_device_that_returns_a_bad_id(mem: GuestMemory) -> None:
    """The driver side is guarded too: a used descriptor naming an id out of range or one
    not in flight marks the queue broken (BAD_RING); unused buffers are still detached."""
    drv = driver_queue(mem, False, False, num=8)
    try:
        assert virtqueue_add_sgs(drv, [(data_base(8), 8)], [(data_base(8) + 8, 8)], "x") == 0
        h = drv.desc_h
        h[6] = 200
        h[7] = 0x8080
        with pytest.raises(BadRing, match="out of range"):
            virtqueue_get_buf(drv)
        assert drv.broken
        assert virtqueue_detach_unused_buf(drv) == "x"
        assert drv.num_free == 8
    finally:
        drv.v.release()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_driver_chain_of_out_and_in_buffers_as_the_device_sees_it(mem: GuestMemory,
                                                                  indirect: bool) -> None:
    """virtqueue_add_sgs (the control queue's call) of two readable and one writable buffer:
    the device pops them as two out and one in buffers, at the driver's addresses, under the
    buffer id the driver chose; what the device writes and its length come back."""
    vdev, vq = make_packed_device(mem, 8, layout_at(RING_BASE, 8), indirect=indirect)
    drv = driver_queue(mem, False, indirect, num=8)
    try:
        base = data_base(8)
        mem.ram[base : base + 8] = b"hdrcmd!!"
        for k in range(11):  # past the ring's end: the chain wraps, the wrap counter flips
            assert virtqueue_add_sgs(drv, [(base, 2), (base + 2, 6)], [(base + 64, 1)], k) == 0
            assert drv.indirect_adds == (k + 1 if indirect else 0)
            elem = virtqueue_pop(vq)
            assert elem is not None
            assert [bytes(s) for s in elem.out_sg] == [b"hd", b"rcmd!!"]
            assert elem.out_addr == [base, base + 2] and elem.in_addr == [base + 64]
            assert elem.ndescs == (1 if indirect else 3)
            elem.in_sg[0][0] = k
            virtqueue_push(vq, elem, 1)
            assert virtqueue_get_buf(drv) == (k, 1)
            assert mem.ram[base + 64] == k
        assert vdev.errors == [] and drv.num_free == 8
    finally:
        drv.v.release()
        release_packed_device(vq)
