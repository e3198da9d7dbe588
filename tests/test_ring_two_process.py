"""The split ring shared by a driver and a device in two processes, and single-process checks
of the device's side against rings written by ``common.vring_mock.MockSplitQueue``.

The two-process test runs the guest's real ``guestproc.virtio_ring`` in one spawned process and
QEMU's real ``qemuproc.virtio`` in another, over one POSIX shared-memory segment; a named
semaphore stands for the kick (ioeventfd). Nothing but the ring memory carries the buffers.
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
    device_for,
    event_notifier,
    guest_memory,
    make_device,
    release_device,
    restore_device_indices,
)
from two_process import run_driver_and_device

from common.guest_memory import GuestMemory
from common.notifier import EventNotifier
from common.vring import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    VringLayout,
)
from common.vring_mock import MockSplitQueue, RawDesc
from guestproc.virtio_ring import (
    Virtqueue,
    virtqueue_add_inbuf,
    virtqueue_add_outbuf,
    virtqueue_disable_cb,
    virtqueue_enable_cb_delayed,
    virtqueue_get_buf,
    virtqueue_kick_prepare,
    virtqueue_notify,
    vring_create_virtqueue,
    vring_interrupt,
)
from qemuproc.virtio import (
    virtio_notify,
    virtio_queue_empty,
    virtio_queue_set_notification,
    virtqueue_pop,
    virtqueue_push,
)

pytestmark = pytest.mark.usefixtures("no_leftovers")

NUM = 256
RING_BASE = PAGE
SLOT = 256
MEM_SIZE = 1 << 20
HDR_LEN = 10
KICK_WAIT_S = 2.0
NO_PROGRESS_S = 20.0


def data_base(num: int = NUM) -> int:
    return (VringLayout(num, RING_BASE).end + PAGE - 1) & ~(PAGE - 1)


def payload(seq: int) -> bytes:
    """Datagram ``seq``: distinct, of varying length (16..215 bytes)."""
    length = 16 + (seq * 37) % 200
    return seq.to_bytes(8, "big") + bytes((seq * 7 + i) & 0xFF for i in range(length - 8))


def restore_driver_indices(vq: Virtqueue, idx: int) -> None:
    """Continue a fresh driver queue from a ring whose avail and used indices (and both event
    indices) stand at ``idx``, as after a migration."""
    idx &= 0xFFFF
    vq.avail_idx_shadow = vq.last_used_idx = idx
    vq.avail[1] = vq.avail[2 + vq.num] = idx
    vq.used_hdr[1] = vq.avail_event_h[0] = idx


# -- the two processes -------------------------------------------------------------------------


def driver_main(shm: str, kick_name: str, n: int, start: int, event_idx: bool, seed: int,
                conn: Connection) -> None:
    """The guest: add ``n`` out-buffers (one or two descriptors each), kick when the ring
    asks for it, reclaim the used ones; report what was added, in order."""
    out: dict[str, Any] = {"added": [], "error": None, "kicks": 0}
    mem = GuestMemory(shm)
    kick = EventNotifier(kick_name)

    def notify(vq: Virtqueue) -> bool:
        kick.set()
        return True

    vq = vring_create_virtqueue(1, NUM, RING_BASE, mem.ram, None, notify, None, "output.0",
                                event_idx)
    restore_driver_indices(vq, start)
    conn.send("ready")
    shapes = random.Random(seed)
    batches = random.Random(seed + 1)
    free_slots = list(range(NUM))
    in_flight: list[tuple[int, int]] = []
    batch, batch_len = 0, 1

    def kick_if_needed() -> None:
        nonlocal batch, batch_len
        if vq.num_added and virtqueue_kick_prepare(vq):
            virtqueue_notify(vq)
        batch, batch_len = 0, batches.randint(1, 8)

    def reclaim() -> int:
        got = 0
        while (r := virtqueue_get_buf(vq)) is not None:
            (seq, slot), length = r
            want_seq, _ = in_flight.pop(0)
            if seq != want_seq or length != len(payload(seq)):
                raise AssertionError(f"used buffer {seq} (len {length}), expected {want_seq}")
            free_slots.append(slot)
            got += 1
        return got

    try:
        last_progress = time.monotonic()
        for seq in range(n):
            data = payload(seq)
            ndesc = 2 if shapes.random() < 0.3 else 1
            while vq.num_free < ndesc or not free_slots:
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
            sgs = [(addr, len(data))] if ndesc == 1 else [
                (addr, HDR_LEN), (addr + HDR_LEN, len(data) - HDR_LEN)]
            head = vq.free_head
            rc = virtqueue_add_outbuf(vq, sgs, (seq, slot))
            if rc != 0:
                raise AssertionError(f"virtqueue_add_outbuf failed: {rc}")
            in_flight.append((seq, slot))
            out["added"].append((seq, head, sgs))
            batch += 1
            if batch >= batch_len:
                kick_if_needed()
        kick_if_needed()
        last_progress = time.monotonic()
        while in_flight:
            if reclaim():
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > NO_PROGRESS_S:
                raise TimeoutError(f"{len(in_flight)} buffers never came back")
            else:
                time.sleep(0.0002)
        out["kicks"] = vq.kicks
        out["num_free"] = vq.num_free
        out["last_used_idx"] = vq.last_used_idx
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails with it
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.send(out)
        vq.v.release()
        kick.close()
        mem.close()


def device_main(shm: str, kick_name: str, n: int, start: int, event_idx: bool,
                conn: Connection) -> None:
    """QEMU: wait for kicks; on each, like virtio_net_tx_bh, pop every chain with
    notifications off, push it back, re-enable and look once more. Reports every chain
    popped, and each wait that timed out although buffers were waiting (a lost kick)."""
    out: dict[str, Any] = {"popped": [], "lost_kicks": 0, "kicks": 0, "errors": []}
    mem = GuestMemory(shm)
    kick = EventNotifier(kick_name)
    vdev, vq = make_device(mem, NUM, RING_BASE, event_idx=event_idx)
    restore_device_indices(vq, start)
    popped = out["popped"]
    try:
        last_progress = time.monotonic()
        while not vdev.broken:
            while True:
                virtio_queue_set_notification(vq, False)
                while (elem := virtqueue_pop(vq)) is not None:
                    data = b"".join(bytes(sg) for sg in elem.out_sg)
                    descs = [(a, len(sg)) for a, sg in zip(elem.out_addr, elem.out_sg,
                                                          strict=True)]
                    popped.append((elem.index, descs, len(elem.in_sg), data))
                    virtqueue_push(vq, elem, len(data))
                    last_progress = time.monotonic()
                virtio_queue_set_notification(vq, True)
                if vdev.broken or virtio_queue_empty(vq):
                    break
            if len(popped) >= n:
                break
            if kick.wait(KICK_WAIT_S):
                out["kicks"] += 1
            elif not virtio_queue_empty(vq):
                out["lost_kicks"] += 1
            elif time.monotonic() - last_progress > NO_PROGRESS_S:
                break
        out["last_avail_idx"] = vq.last_avail_idx
        out["used_idx"] = vq.used_idx
        out["inuse"] = vq.inuse
    finally:
        out["errors"] = vdev.errors
        conn.send(out)
        release_device(vq)
        kick.close()
        mem.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("start", [0, 0xFF00], ids=["from0", "across_u16_wrap"])
def test_driver_and_device_processes_share_one_ring(event_idx: bool, start: int) -> None:
    """3000 buffers (the ring wraps ~12 times; from 0xFF00 the u16 indices wrap too) added by
    the guest's driver in one process are popped by QEMU's device code in another exactly
    once each, in order, with the descriptors and bytes the driver wrote; every used buffer
    comes back to the driver, and no kick the device needed was suppressed."""
    n = 3000
    with guest_memory(MEM_SIZE) as mem, event_notifier() as kick:
        drv, dev = run_driver_and_device(
            driver_main, (mem.name, kick.name, n, start, event_idx, 1234 + start),
            device_main, (mem.name, kick.name, n, start, event_idx))
    assert drv["error"] is None
    assert dev["errors"] == []
    assert drv["exitcode"] == 0 and dev["exitcode"] == 0
    added = drv["added"]
    popped = dev["popped"]
    assert len(added) == n
    assert len(popped) == n
    for (seq, head, sgs), (index, descs, in_num, data) in zip(added, popped, strict=True):
        assert (index, descs, in_num) == (head, [tuple(s) for s in sgs], 0), f"buffer {seq}"
        assert data == payload(seq), f"buffer {seq}"
    assert dev["last_avail_idx"] == dev["used_idx"] == (start + n) & 0xFFFF
    assert dev["inuse"] == 0
    assert drv["last_used_idx"] == (start + n) & 0xFFFF
    assert drv["num_free"] == NUM
    assert dev["lost_kicks"] == 0
    assert 1 <= dev["kicks"] <= drv["kicks"]


# -- one process: the mock against the real driver and the real device ------------------------


@pytest.fixture
def ring() -> Iterator[MockSplitQueue]:
    with guest_memory(MEM_SIZE) as mem:
        mock = MockSplitQueue(mem, 16)
        try:
            yield mock
        finally:
            mock.release()


@pytest.mark.timeout(30)
def test_mock_reads_what_the_real_driver_writes(ring: MockSplitQueue) -> None:
    """The mock's view of the ring (descriptors, avail entries and index) is the real
    driver's: the layout and encoding the fuzz tests build on are the driver's own."""
    vq = vring_create_virtqueue(0, ring.num, ring.layout.base, ring.mem.ram, None,
                                lambda q: True, None, "output.0", True)
    try:
        base = ring.data_base
        assert virtqueue_add_outbuf(vq, [(base, 10), (base + 10, 50)], "a") == 0
        assert virtqueue_add_inbuf(vq, [(base + 100, 1500)], "b") == 0
        assert ring.avail_idx == 2
        assert [ring.avail_entry(0), ring.avail_entry(1)] == [0, 2]
        assert ring.read_desc(0) == RawDesc(base, 10, VRING_DESC_F_NEXT, 1)
        assert ring.read_desc(1).addr == base + 10 and ring.read_desc(1).len == 50
        assert not ring.read_desc(1).flags & VRING_DESC_F_NEXT
        assert ring.read_desc(2) == RawDesc(base + 100, 1500, VRING_DESC_F_WRITE, 3)
    finally:
        vq.v.release()


@pytest.mark.timeout(30)
def test_device_pops_mock_chains_and_driver_reclaims(ring: MockSplitQueue) -> None:
    """Chains written by the mock come out of virtqueue_pop mapped exactly (out before in,
    same addresses and lengths), and virtqueue_push lands in the used ring as (head, len)."""
    vdev, vq = device_for(ring)
    chains = [([b"h" * 10, b"frame-one"], ()), ([b"x" * 100], (64, 32)), ([], (2048,))]
    heads = [ring.add_chain(out, ins) for out, ins in chains]
    for k, (out, ins) in enumerate(chains):
        elem = virtqueue_pop(vq)
        assert elem is not None and elem.index == heads[k]
        assert [bytes(sg) for sg in elem.out_sg] == out
        assert [len(sg) for sg in elem.in_sg] == list(ins)
        for sg in elem.in_sg:
            sg[:] = b"\xab" * len(sg)
        virtqueue_push(vq, elem, 7 + k)
    assert virtqueue_pop(vq) is None
    assert vdev.errors == []
    assert ring.used_idx == 3
    assert [ring.used_elem(k) for k in range(3)] == [(h, 7 + k) for k, h in enumerate(heads)]
    last = ring.read_desc(heads[2])
    assert ring.read_data(last.addr, last.len) == b"\xab" * last.len
    release_device(vq)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("hostile", "message"), [
    ("avail_idx_jump", "Guest moved used index"),
    ("head_out_of_range", "Guest says index"),
    ("next_out_of_range", "Desc next is"),
    ("loop", "Looped descriptor"),
    ("outside_ram", "bogus descriptor"),
    ("zero_length", "zero sized buffers"),
    ("indirect", "Indirect descriptors not negotiated"),
    ("write_then_read", "Incorrect order"),
])
def test_device_refuses_hostile_rings(ring: MockSplitQueue, hostile: str, message: str) -> None:
    """Each way a guest can lie in the ring ends in virtio_error (device broken, nothing
    popped), never in an exception or a mapping outside guest RAM."""
    vdev, vq = device_for(ring)
    addr = ring.alloc(64)
    if hostile == "avail_idx_jump":
        ring.write_desc(0, addr, 64)
        ring.set_avail_idx(ring.num + 1)
    elif hostile == "head_out_of_range":
        ring.set_avail_entry(0, ring.num)
        ring.set_avail_idx(1)
    elif hostile == "next_out_of_range":
        ring.write_desc(0, addr, 64, VRING_DESC_F_NEXT, ring.num + 3)
        ring.publish(0)
    elif hostile == "loop":
        ring.write_desc(0, addr, 64, VRING_DESC_F_NEXT, 1)
        ring.write_desc(1, addr, 64, VRING_DESC_F_NEXT, 0)
        ring.publish(0)
    elif hostile == "outside_ram":
        ring.write_desc(0, ring.mem.size - 8, 64)
        ring.publish(0)
    elif hostile == "zero_length":
        ring.write_desc(0, addr, 0)
        ring.publish(0)
    elif hostile == "indirect":
        ring.write_desc(0, addr, 64, VRING_DESC_F_INDIRECT)
        ring.publish(0)
    elif hostile == "write_then_read":
        ring.build_chain([RawDesc(addr, 32, VRING_DESC_F_WRITE), RawDesc(addr + 32, 32)], 0)
        ring.publish(0)
    assert virtqueue_pop(vq) is None
    assert vdev.broken
    assert any(message in e for e in vdev.errors), vdev.errors
    assert ring.used_idx == 0
    release_device(vq)


@pytest.mark.timeout(30)
def test_no_notify_flag_suppresses_kicks(ring: MockSplitQueue) -> None:
    """Without EVENT_IDX: while the device has notifications off (VRING_USED_F_NO_NOTIFY)
    the driver does not kick; once they are back on, it does."""
    vdev, vq = device_for(ring)
    drv = vring_create_virtqueue(0, ring.num, ring.layout.base, ring.mem.ram, None,
                                 lambda q: True, None, "output.0", False)
    try:
        virtio_queue_set_notification(vq, False)
        assert ring.used_flags & VRING_USED_F_NO_NOTIFY
        assert virtqueue_add_outbuf(drv, [(ring.data_base, 60)], 1) == 0
        assert not virtqueue_kick_prepare(drv)
        virtio_queue_set_notification(vq, True)
        assert virtqueue_add_outbuf(drv, [(ring.data_base, 60)], 2) == 0
        assert virtqueue_kick_prepare(drv)
    finally:
        drv.v.release()
        release_device(vq)


@pytest.mark.timeout(30)
def test_event_idx_disabled_notifications_suppress_kicks(ring: MockSplitQueue) -> None:
    """With EVENT_IDX, a device that turned notifications off (as virtio_net_handle_tx_bh
    does before flushing) and pops while off is not kicked for buffers added meanwhile."""
    vdev, vq = device_for(ring, event_idx=True)
    drv = vring_create_virtqueue(0, ring.num, ring.layout.base, ring.mem.ram, None,
                                 lambda q: True, None, "output.0", True)
    try:
        virtio_queue_set_notification(vq, True)
        assert virtqueue_add_outbuf(drv, [(ring.data_base, 60)], 1) == 0
        assert virtqueue_kick_prepare(drv)
        virtio_queue_set_notification(vq, False)
        elem = virtqueue_pop(vq)
        assert elem is not None
        assert virtqueue_add_outbuf(drv, [(ring.data_base, 60)], 2) == 0
        assert not virtqueue_kick_prepare(drv)
    finally:
        drv.v.release()
        release_device(vq)


# -- the interrupt side's used_event rule, across two processes ---------------------------------

ROUNDS = (1, 2, 3, 4, 5, 8, 17, 64, 100, 255, 256, 7, 200)
"""Buffers pending in each round (the first, of one, makes the device's signalled_used valid)."""
IRQ_WAIT_S = 20.0


def delayed_cb_driver_main(shm: str, kick_name: str, irq_name: str, start: int,
                           conn: Connection) -> None:
    """The guest, as start_xmit does: each round adds out-buffers, turns callbacks off, then
    back on with ``virtqueue_enable_cb_delayed`` and kicks; it takes the one interrupt in
    ``vring_interrupt``, waits until all are used, reclaims them. Reports, per round, the
    used_event it left and how many callbacks the interrupt ran."""
    out: dict[str, Any] = {"rounds": [], "error": None}
    mem = GuestMemory(shm)
    kick, irq = EventNotifier(kick_name), EventNotifier(irq_name)
    callbacks = [0]

    def notify(vq: Virtqueue) -> bool:
        kick.set()
        return True

    def callback(vq: Virtqueue) -> None:
        callbacks[0] += 1

    vq = vring_create_virtqueue(1, NUM, RING_BASE, mem.ram, None, notify, callback,
                                "output.0", True)
    restore_driver_indices(vq, start)
    conn.send("ready")
    try:
        for pending in ROUNDS:
            before = vq.avail_idx_shadow
            for i in range(pending):
                addr = data_base() + i * SLOT
                if virtqueue_add_outbuf(vq, [(addr, 64)], i) != 0:
                    raise AssertionError(f"virtqueue_add_outbuf failed with {vq.num_free} free")
            virtqueue_disable_cb(vq)
            armed = virtqueue_enable_cb_delayed(vq)
            used_event = vq.avail[2 + vq.num]
            virtqueue_notify(vq)
            if not irq.wait(IRQ_WAIT_S):
                raise TimeoutError(f"no interrupt for a round of {pending}")
            calls = callbacks[0]
            vring_interrupt(0, vq)
            calls = callbacks[0] - calls
            last_progress = time.monotonic()
            end = (before + pending) & 0xFFFF
            while vq.used_hdr[1] != end:
                if time.monotonic() - last_progress > NO_PROGRESS_S:
                    raise TimeoutError(f"the device used {vq.used_hdr[1]} of {end}")
                time.sleep(0.0002)
            got = 0
            while virtqueue_get_buf(vq) is not None:
                got += 1
            out["rounds"].append({"pending": pending, "before": before, "armed": armed,
                                  "used_event": used_event, "callbacks": calls,
                                  "reclaimed": got})
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails with it
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.send(out)
        vq.v.release()
        kick.close()
        irq.close()
        mem.close()


def delayed_cb_device_main(shm: str, kick_name: str, irq_name: str, start: int,
                           conn: Connection) -> None:
    """QEMU, as virtio_net_flush_tx does: on each kick, pop the round's buffers and push
    them one by one, calling ``virtio_notify`` after each; its interrupt is the irq
    semaphore. Reports the used index at every interrupt it raised, per round."""
    out: dict[str, Any] = {"interrupts": [], "errors": [], "error": None}
    mem = GuestMemory(shm)
    kick, irq = EventNotifier(kick_name), EventNotifier(irq_name)
    vdev, vq = make_device(mem, NUM, RING_BASE, event_idx=True)
    restore_device_indices(vq, start)
    round_no = [0]

    def raise_irq(vector: int) -> None:
        out["interrupts"].append((round_no[0], vq.used_idx))
        irq.set()

    vdev.notify_vector = raise_irq
    try:
        for r, pending in enumerate(ROUNDS):
            round_no[0] = r
            if not kick.wait(IRQ_WAIT_S):
                raise TimeoutError(f"no kick for round {r}")
            for _ in range(pending):
                elem = virtqueue_pop(vq)
                if elem is None:
                    raise AssertionError(f"round {r}: fewer than {pending} buffers available")
                virtqueue_push(vq, elem, 0)
                virtio_notify(vdev, vq)
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails with it
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        out["errors"] = vdev.errors
        conn.send(out)
        release_device(vq)
        kick.close()
        irq.close()
        mem.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start", [0, 0xFFC0], ids=["from0", "across_u16_wrap"])
def test_interrupt_after_three_quarters_of_the_pending_buffers(start: int) -> None:
    """Linux's ``virtqueue_enable_cb_delayed`` asks for the interrupt once 3/4 of the
    pending buffers are used (used_event = last_used_idx + pending * 3 // 4), and QEMU's
    ``virtio_notify`` in another process honours it: one interrupt per round, raised by
    the push that moves the used index past used_event, none for the other pushes."""
    with guest_memory(MEM_SIZE) as mem, event_notifier() as kick, event_notifier() as irq:
        names = (mem.name, kick.name, irq.name, start)
        drv, dev = run_driver_and_device(delayed_cb_driver_main, names,
                                         delayed_cb_device_main, names)
    assert drv["error"] is None and dev["error"] is None, (drv["error"], dev["error"])
    assert dev["errors"] == []
    assert [r["pending"] for r in drv["rounds"]] == list(ROUNDS)
    by_round: dict[int, list[int]] = {}
    for r, used_idx in dev["interrupts"]:
        by_round.setdefault(r, []).append(used_idx)
    for r, rnd in enumerate(drv["rounds"]):
        pending, before = rnd["pending"], rnd["before"]
        wanted_event = (before + pending * 3 // 4) & 0xFFFF
        assert rnd["armed"] is True, rnd
        assert rnd["used_event"] == wanted_event, rnd
        assert by_round.get(r) == [(wanted_event + 1) & 0xFFFF], (r, rnd, by_round.get(r))
        assert rnd["callbacks"] == 1 and rnd["reclaimed"] == pending, rnd
    assert drv["rounds"][-1]["before"] == (start + sum(ROUNDS[:-1])) & 0xFFFF
