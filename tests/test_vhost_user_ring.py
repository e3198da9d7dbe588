"""The backend's virtqueue (vhostuserproc/libvhost_user.py) on a ring the driver-side mock
writes: guest RAM handed over as a front-end does (SET_MEM_TABLE with the segment's fd, ring
addresses in the front-end's own address space), well-formed chains served, and every
hostile ring ending in ``vu_panic`` with no exception and no access outside the region.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from ringmock import guest_memory

from common.guest_memory import GuestMemory
from common.vhost_user_abi import (
    INFLIGHT,
    U64,
    VRING_ADDR,
    VRING_STATE,
    VhostUserMemoryRegion,
    VhostUserMsg,
    VhostUserProtocolFeature,
    VhostUserRequest,
    pack_memory,
    recv_msg,
)
from common.virtio_abi import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from common.vring import DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from common.vring_mock import MockPackedQueue, MockSplitQueue, RawDesc
from vhostuserproc.libvhost_user import (
    vu_deinit,
    vu_dispatch,
    vu_queue_get_avail_bytes,
    vu_queue_notify,
    vu_queue_pop,
    vu_queue_push,
    vu_queue_set_notification,
)
from vhostuserproc.vu_dev import VuDev

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("no_leftovers")]
QVA = 0x7F12_3400_0000
"""Where the 'front-end' has guest RAM mapped: ring addresses are given in its space."""
NUM = 16
R = VhostUserRequest


class Iface:
    def __init__(self) -> None:
        self.started: list[tuple[int, bool]] = []

    def get_features(self, dev: VuDev) -> int:
        return 0

    def set_features(self, dev: VuDev, features: int) -> None:
        pass

    def get_protocol_features(self, dev: VuDev) -> int:
        return 0

    def process_msg(self, dev: VuDev, vmsg: VhostUserMsg) -> bool | None:
        return None

    def queue_set_started(self, dev: VuDev, qidx: int, started: bool) -> None:
        self.started.append((qidx, started))

    def queue_is_processed_in_order(self, dev: VuDev, qidx: int) -> bool:
        return True


def send(dev: VuDev, req: int, payload: bytes = b"", fds: list[int] | None = None) -> bool:
    return vu_dispatch(dev, VhostUserMsg(req, 1, payload, fds or []))


def shm_fd(mem: GuestMemory) -> int:
    return os.open(f"/dev/shm{mem.name}", os.O_RDWR)


@contextmanager
def backend_on(mem: GuestMemory, desc: int, avail: int, used: int, features: int,
               protocol: int = 0, inflight: tuple[int, int] | None = None
               ) -> Iterator[tuple[VuDev, int]]:
    """A VuDev given ``mem`` and queue 0 at those guest-physical addresses, as a front-end
    sets it up; yields it and the call eventfd's read end."""
    panics: list[str] = []
    ours, theirs = socket.socketpair()
    dev = VuDev(2, ours, lambda d, m: panics.append(m), lambda *a: None, lambda fd: None,
                Iface())
    dev.panics = panics  # type: ignore[attr-defined]
    dev.peer = theirs  # type: ignore[attr-defined]
    call = os.eventfd(0, os.EFD_NONBLOCK)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    err = os.eventfd(0, os.EFD_NONBLOCK)
    dev.err = err  # type: ignore[attr-defined]
    try:
        assert send(dev, R.SET_FEATURES, U64.pack(features | 1 << VIRTIO_F_VERSION_1))
        assert send(dev, R.SET_PROTOCOL_FEATURES, U64.pack(protocol))
        region = VhostUserMemoryRegion(0, mem.size, QVA, 0)
        assert send(dev, R.SET_MEM_TABLE, pack_memory([region]), [shm_fd(mem)])
        assert send(dev, R.SET_VRING_NUM, VRING_STATE.pack(0, NUM))
        assert send(dev, R.SET_VRING_ADDR, VRING_ADDR.pack(0, 0, QVA + desc, QVA + used,
                                                           QVA + avail, 0))
        base = 1 << 15 if features >> VIRTIO_F_RING_PACKED & 1 else 0  # wrap counters 1
        assert send(dev, R.SET_VRING_BASE, VRING_STATE.pack(0, base))
        assert send(dev, R.SET_VRING_CALL, U64.pack(0), [os.dup(call)])
        assert send(dev, R.SET_VRING_ERR, U64.pack(0), [os.dup(err)])
        if protocol >> VhostUserProtocolFeature.INFLIGHT_SHMFD & 1:
            if inflight is None:  # QEMU asks for the area before the queues start
                assert send(dev, R.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, 2, NUM))
                reply = recv_msg(theirs)
                assert len(reply.fds) == 1
                inflight = (reply.fds[0], INFLIGHT.unpack(reply.payload)[0])
            dev.inflight_area = (os.dup(inflight[0]), inflight[1])  # type: ignore[attr-defined]
            assert send(dev, R.SET_INFLIGHT_FD, INFLIGHT.pack(inflight[1], 0, 2, NUM),
                        [inflight[0]])
        assert send(dev, R.SET_VRING_KICK, U64.pack(0), [os.dup(kick)])
        assert send(dev, R.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
        os.eventfd_read(call)  # SET_VRING_CALL signals once (I/O hang after reconnect)
        yield dev, call
    finally:
        vu_deinit(dev)
        os.close(call)
        os.close(kick)
        os.close(err)
        ours.close()
        theirs.close()


@contextmanager
def split(features: int = 0, protocol: int = 0
          ) -> Iterator[tuple[MockSplitQueue, VuDev, int, GuestMemory]]:
    with guest_memory(1 << 20) as mem:
        mock = MockSplitQueue(mem, NUM)
        lay = mock.layout
        try:
            with backend_on(mem, lay.desc, lay.avail, lay.used, features, protocol) as (d, c):
                yield mock, d, c, mem
        finally:
            mock.release()


def calls(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_pop_maps_the_chain_and_push_fills_the_used_ring() -> None:
    with split() as (mock, dev, call, _):
        head = mock.add_chain([b"hello ", b"world"], [100, 28])
        elem = vu_queue_pop(dev, dev.vq[0])
        assert elem is not None and elem.index == head
        assert b"".join(bytes(m) for m in elem.out_sg) == b"hello world"
        assert [len(m) for m in elem.in_sg] == [100, 28]
        elem.in_sg[0][:3] = b"abc"
        vu_queue_push(dev, dev.vq[0], elem, 3)
        vu_queue_notify(dev, dev.vq[0])
        assert mock.used_idx == 1 and mock.used_elem(0) == (head, 3)
        assert calls(call) == 1
        assert vu_queue_pop(dev, dev.vq[0]) is None and not dev.broken


def test_indirect_table_is_walked() -> None:
    with split(1 << VIRTIO_RING_F_INDIRECT_DESC) as (mock, dev, _, mem):
        a, b = mock.alloc(4), mock.alloc(64)
        mock.write_data(a, b"ping")
        table = mock.alloc(32)
        mem.ram[table : table + 32] = DESC.pack(a, 4, VRING_DESC_F_NEXT, 1) + \
            DESC.pack(b, 64, VRING_DESC_F_WRITE, 0)
        head = mock.build_chain([RawDesc(table, 32, VRING_DESC_F_INDIRECT)])
        mock.publish(head)
        assert vu_queue_get_avail_bytes(dev, dev.vq[0], 1 << 30, 1 << 30) == (64, 4)
        elem = vu_queue_pop(dev, dev.vq[0])
        assert elem is not None and bytes(elem.out_sg[0]) == b"ping"
        assert [len(m) for m in elem.in_sg] == [64]


def test_event_idx_notifies_only_past_used_event() -> None:
    """vring_need_event: a call when the used index passes the used_event the driver
    wrote, none while it stays behind; pop publishes avail_event."""
    with split(1 << VIRTIO_RING_F_EVENT_IDX) as (mock, dev, call, _):
        vq = dev.vq[0]
        mock.set_used_event(0)
        for _ in range(3):
            mock.add_chain([b"x"])
        for n in range(3):
            elem = vu_queue_pop(dev, vq)
            assert elem is not None
            assert mock.avail_event == n + 1
            vu_queue_push(dev, vq, elem, 0)
            vu_queue_notify(dev, vq)
        assert calls(call) == 1  # used 0 -> 1 passes used_event 0; 1 -> 2, 2 -> 3 do not
        mock.set_used_event(3)
        mock.add_chain([b"y"])
        elem = vu_queue_pop(dev, vq)
        assert elem is not None
        vu_queue_push(dev, vq, elem, 0)
        vu_queue_notify(dev, vq)
        assert calls(call) == 1


def test_set_notification_without_event_idx_sets_no_notify() -> None:
    with split() as (mock, dev, _, _m):
        vu_queue_set_notification(dev, dev.vq[0], False)
        assert mock.used_flags & 1
        vu_queue_set_notification(dev, dev.vq[0], True)
        assert not mock.used_flags & 1


OUTSIDE = 1 << 30


def _chain(mock: MockSplitQueue, mem: GuestMemory, kind: str) -> None:
    a = mock.alloc(64)
    if kind == "addr-outside":
        mock.write_desc(0, OUTSIDE, 64)
    elif kind == "len-past-region":
        mock.write_desc(0, a, 0xFFFF_FFFF)
    elif kind == "zero-len":
        mock.write_desc(0, a, 0)
    elif kind == "loop":
        mock.write_desc(0, a, 8, VRING_DESC_F_NEXT, 1)
        mock.write_desc(1, a, 8, VRING_DESC_F_NEXT, 0)
    elif kind == "next-past-table":
        mock.write_desc(0, a, 8, VRING_DESC_F_NEXT, NUM + 3)
    elif kind == "write-then-read":
        mock.write_desc(0, a, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
        mock.write_desc(1, a, 8, 0, 0)
    elif kind == "indirect-odd-len":
        mock.write_desc(0, a, 20, VRING_DESC_F_INDIRECT)
    elif kind == "indirect-outside":
        mock.write_desc(0, OUTSIDE, 32, VRING_DESC_F_INDIRECT)
    elif kind == "indirect-huge":
        mock.write_desc(0, a, 0xFFFF_FFF0, VRING_DESC_F_INDIRECT)
    elif kind == "indirect-loop":
        mem.ram[a : a + 32] = DESC.pack(a, 8, VRING_DESC_F_NEXT, 1) + \
            DESC.pack(a, 8, VRING_DESC_F_NEXT, 0)
        mock.write_desc(0, a, 32, VRING_DESC_F_INDIRECT)
    elif kind == "indirect-nested":
        mem.ram[a : a + 16] = DESC.pack(a, 16, VRING_DESC_F_INDIRECT, 0)
        mock.write_desc(0, a, 16, VRING_DESC_F_INDIRECT)
    if kind == "head-past-table":
        mock.set_avail_entry(0, NUM + 1)
        mock.set_avail_idx(1)
    elif kind == "avail-idx-jump":
        mock.write_desc(0, a, 8)
        mock.set_avail_entry(0, 0)
        mock.set_avail_idx(NUM + 5)
    else:
        mock.set_avail_entry(0, 0)
        mock.set_avail_idx(1)


@pytest.mark.parametrize("kind", [
    "addr-outside", "len-past-region", "zero-len", "loop", "next-past-table",
    "write-then-read", "indirect-odd-len", "indirect-outside", "indirect-huge",
    "indirect-loop", "indirect-nested", "head-past-table", "avail-idx-jump"])
def test_hostile_chain_ends_in_vu_panic(kind: str) -> None:
    """Each ring no valid driver writes: pop gives nothing, the device is broken with a
    reason, and every later queue operation is a no-op, not an exception."""
    with split(1 << VIRTIO_RING_F_INDIRECT_DESC) as (mock, dev, call, mem):
        _chain(mock, mem, kind)
        vq = dev.vq[0]
        vu_queue_get_avail_bytes(dev, vq, 1 << 30, 1 << 30)  # counts; maps nothing
        assert vu_queue_pop(dev, vq) is None
        assert dev.broken and dev.panics  # type: ignore[attr-defined]
        assert calls(dev.err) == 1  # type: ignore[attr-defined]  # the queue's error eventfd
        assert vu_queue_pop(dev, vq) is None
        vu_queue_notify(dev, vq)
        assert calls(call) == 0 and mock.used_idx == 0


@pytest.mark.parametrize("payload,fds", [
    pytest.param(VRING_STATE.pack(9, 16), 0, id="vring-index"),
    pytest.param(b"", 0, id="empty"),
])
def test_bad_vring_num_panics(payload: bytes, fds: int) -> None:
    with split() as (_, dev, _c, _m):
        assert not send(dev, R.SET_VRING_NUM, payload)
        assert dev.broken


def test_ring_outside_the_regions_is_refused() -> None:
    """SET_VRING_ADDR naming front-end addresses no region holds (or a ring that would run
    past the region's end) panics; nothing is mapped."""
    with split() as (_, dev, _c, mem):
        end = QVA + mem.size - 8
        assert not send(dev, R.SET_VRING_ADDR, VRING_ADDR.pack(1, 0, end, end, end, 0))
        assert dev.broken and dev.vq[1].vring is None


def test_mem_table_fd_count_mismatch_closes_the_fds() -> None:
    with guest_memory() as mem:
        dev = VuDev(2, socket.socket(socket.AF_UNIX), lambda d, m: None, lambda *a: None,
                    lambda fd: None, Iface())
        fds = [shm_fd(mem), shm_fd(mem)]
        region = VhostUserMemoryRegion(0, mem.size, QVA, 0)
        assert not send(dev, R.SET_MEM_TABLE, pack_memory([region]), fds)
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
        assert dev.broken and not dev.regions


def test_inflight_resubmits_what_a_dead_backend_popped() -> None:
    """GET_INFLIGHT_FD's area records each pop; a new backend given it (SET_INFLIGHT_FD)
    on the same ring pops the chains the old one never completed again, oldest first."""
    proto = 1 << VhostUserProtocolFeature.INFLIGHT_SHMFD
    with split(protocol=proto) as (mock, dev, _, mem):
        area = dev.inflight_area  # type: ignore[attr-defined]
        heads = [mock.add_chain([bytes([i])]) for i in range(4)]
        vq = dev.vq[0]
        e = [vu_queue_pop(dev, vq) for _ in range(3)]
        assert all(e)
        vu_queue_push(dev, vq, e[1], 0)  # done out of order; 0 and 2 stay in flight
        lay = mock.layout
        with backend_on(mem, lay.desc, lay.avail, lay.used, 0, proto, area) as (dev2, _c):
            os.close(dev2.inflight_area[0])  # type: ignore[attr-defined]
            again = [vu_queue_pop(dev2, dev2.vq[0]) for _ in range(3)]
            assert [x.index for x in again if x] == [heads[0], heads[2], heads[3]]
            assert not dev2.broken


@contextmanager
def packed(features: int = 0) -> Iterator[tuple[MockPackedQueue, VuDev, int, GuestMemory]]:
    with guest_memory(1 << 20) as mem:
        mock = MockPackedQueue(mem, NUM)
        lay = mock.layout
        try:
            with backend_on(mem, lay.desc, lay.driver, lay.device,
                            features | 1 << VIRTIO_F_RING_PACKED) as (d, c):
                yield mock, d, c, mem
        finally:
            mock.release()


def test_packed_pop_and_push_wrap_the_ring() -> None:
    """Chains offered through two laps of the ring come out in order with their ids, and
    each used descriptor carries the device's wrap counter."""
    with packed() as (mock, dev, call, _):
        vq = dev.vq[0]
        for n in range(2 * NUM):
            a = mock.alloc(8)
            mock.mem.ram[a : a + 8] = n.to_bytes(8, "little")
            pos = mock.offer([(a, 8, 0)], buf_id=n % NUM)
            elem = vu_queue_pop(dev, vq)
            assert elem is not None and elem.index == n % NUM
            assert int.from_bytes(elem.out_sg[0], "little") == n
            vu_queue_push(dev, vq, elem, 5)
            buf_id, length, flags = mock.used_desc(pos)
            wrap = n < NUM
            assert (buf_id, length) == (n % NUM, 5)
            assert bool(flags & 1 << 7) == bool(flags & 1 << 15) == wrap
        assert not dev.broken


@pytest.mark.parametrize("kind", ["addr-outside", "chain-loop", "indirect-outside",
                                  "bad-id"])
def test_packed_hostile_ring_ends_in_vu_panic(kind: str) -> None:
    with packed(1 << VIRTIO_RING_F_INDIRECT_DESC) as (mock, dev, _c, _m):
        a = mock.alloc(8)
        if kind == "addr-outside":
            mock.offer([(OUTSIDE, 8, 0)])
        elif kind == "chain-loop":  # every descriptor chained, all available
            mock.offer([(a, 8, 0)] * NUM + [(a, 8, 0)])
        elif kind == "indirect-outside":
            mock.offer([(OUTSIDE, 32, VRING_DESC_F_INDIRECT)])
        elif kind == "bad-id":
            mock.offer([(a, 8, 0)], buf_id=NUM + 7)
        assert vu_queue_pop(dev, dev.vq[0]) is None
        assert dev.broken


def test_u64_payload_checked() -> None:
    with split() as (_, dev, _c, _m):
        assert not send(dev, R.SET_VRING_CALL, struct.pack("<I", 0))
        assert dev.broken


def test_packed_indirect_stale_write_flag_before_readable_entries() -> None:
    """DPDK's virtio PMD can leave VRING_DESC_F_WRITE on a transmit chain's indirect entry
    (see libvhost_user_packed.py): writable entries followed by a readable one are read,
    in table order, as readable, as DPDK's lib/vhost reads them."""
    from common.vring_packed import PACKED_DESC

    with packed(1 << VIRTIO_RING_F_INDIRECT_DESC) as (mock, dev, _c, mem):
        bufs = [mock.alloc(4) for _ in range(3)]
        for a, data in zip(bufs, (b"hdr.", b"abcd", b"efgh"), strict=True):
            mem.ram[a : a + 4] = data
        table = mock.alloc(48)
        mem.ram[table : table + 48] = b"".join(
            PACKED_DESC.pack(a, 4, 0, f) for a, f in zip(
                bufs, (VRING_DESC_F_WRITE, VRING_DESC_F_NEXT, 0), strict=True))
        mock.offer([(table, 48, VRING_DESC_F_INDIRECT)], buf_id=3)
        elem = vu_queue_pop(dev, dev.vq[0])
        assert elem is not None and not dev.broken and elem.index == 3
        assert b"".join(bytes(m) for m in elem.out_sg) == b"hdr.abcdefgh" and not elem.in_sg


def test_region_larger_than_its_file_is_refused() -> None:
    """A region that claims more bytes than its fd's file has would fault (SIGBUS) when the
    guest's buffers point past the end: SET_MEM_TABLE refuses it."""
    with guest_memory() as mem:
        dev = VuDev(2, socket.socket(socket.AF_UNIX), lambda d, m: None, lambda *a: None,
                    lambda fd: None, Iface())
        region = VhostUserMemoryRegion(0, mem.size * 4, QVA, 0)
        assert not send(dev, R.SET_MEM_TABLE, pack_memory([region]), [shm_fd(mem)])
        assert dev.broken and not dev.regions and "bytes on an fd of" in dev.panic_reason
        dev.sock.close()


def open_fds() -> int:
    """This process's fds but those the leftover watcher's thread opens under /proc."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += not os.readlink(f"/proc/self/fd/{fd}").startswith("/proc/")
        except OSError:
            pass
    return n


def test_fds_with_a_request_that_takes_none_are_closed() -> None:
    """A peer that attaches fds to requests that take none does not fill the table."""
    with split() as (_, dev, _c, _m):
        before = open_fds()
        for _ in range(20):
            fds = [os.eventfd(0), os.eventfd(0)]
            assert send(dev, R.SET_OWNER, b"", fds)
            assert send(dev, R.SET_VRING_ENABLE, VRING_STATE.pack(0, 1), [os.eventfd(0)])
        assert open_fds() == before
