"""vhost-net's handlers (kvmproc/vhost.py, vhost_net.py) driven in one process, as Linux's
drivers/vhost/{vhost,net}.c run them: guest RAM is a real shared-memory segment with
driver-written rings (ringmock), the call eventfd a real named semaphore, and the tap a
datagram socket pair (one read or write per frame, as a tap's file gives).

Each test states what the guest sees in its rings: which heads come back used, with which
lengths, and whether its interrupts and kicks are asked for.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from ringmock import event_notifier, guest_memory

from common.guest_memory import GuestMemory
from common.notifier import EventNotifier
from common.virtio_abi import VIRTIO_RING_F_EVENT_IDX
from common.vring import (
    DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    vring_need_event,
)
from common.vring_mock import PAGE, MockSplitQueue, RawDesc
from kvmproc.vhost import (
    VhostVirtqueue,
    VhostWork,
    vhost_add_used_n,
    vhost_get_vq_desc,
    vhost_vq_init_access,
)
from kvmproc.vhost_net import (
    VHOST_NET_VQ_RX,
    VHOST_NET_VQ_TX,
    VhostNet,
    handle_rx,
    handle_tx,
    vhost_net_open,
    vhost_net_release,
    vhost_net_set_features,
)

pytestmark = pytest.mark.usefixtures("no_leftovers")

NUM = 8
EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX


@dataclass
class Rig:
    n: VhostNet
    rx: MockSplitQueue
    tx: MockSplitQueue
    rx_call: EventNotifier
    tx_call: EventNotifier
    host: socket.socket
    """The tap's far end: what it sends the worker reads as a frame; what the worker
    writes it receives."""

    def vq(self, index: int) -> VhostVirtqueue:
        return self.n.dev.vqs[index]


@pytest.fixture
def rig_factory() -> Iterator:
    with ExitStack() as stack:

        def make(features: int = 0) -> Rig:
            mem = stack.enter_context(guest_memory())
            rx = MockSplitQueue(mem, NUM, base=PAGE, data_base=0x20000)
            tx = MockSplitQueue(mem, NUM, base=4 * PAGE, data_base=0x80000)
            stack.callback(rx.release)
            stack.callback(tx.release)
            rx_call = stack.enter_context(event_notifier())
            tx_call = stack.enter_context(event_notifier())
            n = vhost_net_open()
            assert vhost_net_set_features(n, features) == 0
            n.dev.mm = GuestMemory(mem.name)
            tap, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            tap.setblocking(False)
            for vq, mock, call in ((n.dev.vqs[0], rx, rx_call), (n.dev.vqs[1], tx, tx_call)):
                vq.num = NUM
                vq.desc_addr = mock.layout.desc
                vq.avail_addr = mock.layout.avail
                vq.used_addr = mock.layout.used
                assert n.dev.vq_access_ok(vq)
                vq.call_ctx = EventNotifier(call.name)
                vq.private_data = os.dup(tap.fileno())
                vhost_vq_init_access(vq)
            tap.close()
            stack.callback(host.close)
            stack.callback(vhost_net_release, n)
            return Rig(n, rx, tx, rx_call, tx_call, host)

        yield make


def rx_buffers(rig: Rig, *lengths: int) -> list[tuple[int, int]]:
    """The guest posts one writable buffer per length: (head, address) of each."""
    out = []
    for length in lengths:
        addr = rig.rx.alloc(length)
        head = rig.rx.build_chain([RawDesc(addr, length, VRING_DESC_F_WRITE)])
        rig.rx.publish(head)
        out.append((head, addr))
    return out


def frame(size: int, tag: int) -> bytes:
    return bytes([tag]) * size


# -- RX: what does not fit, and the batch before a busy poll -------------------------------------


@pytest.mark.timeout(20)
def test_rx_frame_too_big_for_the_buffer_is_dropped_and_its_buffer_given_back(rig_factory
                                                                               ) -> None:
    """Without mergeable buffers a frame takes one buffer. One that does not fit goes to
    get_rx_bufs' ``err:`` (vhost_discard_vq_desc) and handle_rx drops it: the guest's buffer
    is not lost, the next frame lands in it."""
    rig = rig_factory()
    (a, a_addr), (b, _) = rx_buffers(rig, 64, 64)
    rig.host.send(frame(200, 1))
    rig.host.send(frame(50, 2))
    handle_rx(rig.n)
    assert rig.rx.used_idx == 1
    assert rig.rx.used_elem(0) == (a, 50)
    assert rig.rx.read_data(a_addr, 50) == frame(50, 2)
    assert rig.vq(VHOST_NET_VQ_RX).last_avail_idx == 1  # b is still the guest's to fill
    assert rig.n.vqs[VHOST_NET_VQ_RX].dropped == 1
    rig.host.send(frame(60, 3))
    handle_rx(rig.n)
    assert rig.rx.used_idx == 2 and rig.rx.used_elem(1) == (b, 60)


@pytest.mark.timeout(40)
def test_rx_batched_heads_reach_the_guest_before_the_busy_poll(rig_factory) -> None:
    """With busyloop_timeout set, the worker signals the heads it has batched before it
    spins on the tap (``vhost_net_rx_peek_head_len``: "Flush batched heads first"): the
    guest has its frames while the worker is still polling, not when the poll ends."""
    rig = rig_factory()
    rx_buffers(rig, 128, 128, 128, 128)
    rig.host.send(frame(40, 1))
    rig.host.send(frame(41, 2))
    rig.vq(VHOST_NET_VQ_RX).busyloop_timeout = 30_000_000  # 30 s
    worker = threading.Thread(target=handle_rx, args=(rig.n,), daemon=True)
    worker.start()
    try:
        got = rig.rx_call.wait(10.0)
        polling = worker.is_alive()
        used = rig.rx.used_idx
    finally:
        rig.n.dev.vhost_work_queue(VhostWork(lambda w: None, "stop-poll"))  # vhost_has_work
        worker.join(10.0)
    assert not worker.is_alive()
    assert got and polling and used == 2
    assert [rig.rx.used_elem(i)[1] for i in range(2)] == [40, 41]


@pytest.mark.timeout(20)
def test_rx_bad_chain_is_consumed_with_a_vq_error_and_the_next_kick_goes_on(rig_factory
                                                                          ) -> None:
    """A device-readable descriptor in an RX chain, or a chain with no writable byte, is a
    vq_err: the heads taken before it go back (none here), the bad chain stays taken, and the
    next pass fills the good buffer after it."""
    rig = rig_factory()
    bad = rig.rx.build_chain([RawDesc(rig.rx.alloc(64), 64)])  # readable
    rig.rx.publish(bad)
    empty = rig.rx.build_chain([RawDesc(rig.rx.alloc(64), 0, VRING_DESC_F_WRITE)])
    rig.rx.publish(empty)
    ((good, _),) = rx_buffers(rig, 64)
    rig.host.send(frame(30, 7))
    vq = rig.vq(VHOST_NET_VQ_RX)
    handle_rx(rig.n)
    assert vq.error == "unexpected descriptor format for RX: out 1, in 0"
    assert vq.last_avail_idx == 1 and rig.rx.used_idx == 0
    handle_rx(rig.n)
    assert vq.error == "unexpected descriptor format for RX: out 0, in 0"
    assert vq.last_avail_idx == 2 and rig.rx.used_idx == 0
    handle_rx(rig.n)
    assert rig.rx.used_idx == 1 and rig.rx.used_elem(0) == (good, 30)


# -- the ring: indirect tables as get_indirect reads them ----------------------------------------


@pytest.mark.timeout(20)
def test_indirect_table_is_read_in_order_and_next_goes_on_in_the_main_table(rig_factory
                                                                           ) -> None:
    """INDIRECT is taken without VIRTIO_RING_F_INDIRECT_DESC being checked; inside the table
    only NEXT counts (the ``next`` fields are not followed); INDIRECT|NEXT in the main table
    continues there."""
    rig = rig_factory()
    tx = rig.tx
    bufs = [tx.alloc(16) for _ in range(3)]
    for k, addr in enumerate(bufs):
        tx.write_data(addr, bytes([k + 1]) * 16)
    table = tx.alloc(32)
    tx.write_data(table, DESC.pack(bufs[0], 16, VRING_DESC_F_NEXT, 7)  # next: ignored
                  + DESC.pack(bufs[1], 16, 0, 0))
    tx.write_desc(0, table, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 3)
    tx.write_desc(3, bufs[2], 16)
    tx.publish(0)
    out: list[memoryview] = []
    inn: list[memoryview] = []
    vq = rig.vq(VHOST_NET_VQ_TX)
    assert vhost_get_vq_desc(vq, out, inn) == 0, vq.error
    assert [bytes(m) for m in out] == [bytes([k + 1]) * 16 for k in range(3)] and not inn


@pytest.mark.timeout(20)
def test_used_index_passing_signalled_used_makes_it_invalid(rig_factory) -> None:
    """``__vhost_add_used_n``: if the used index runs past the last signalled one without a
    signal, the next vhost_notify signals whatever used_event says."""
    rig = rig_factory(EVENT_IDX)
    vq = rig.vq(VHOST_NET_VQ_TX)
    vq.last_used_idx = 3
    vq.signalled_used, vq.signalled_used_valid = 5, True
    vhost_add_used_n(vq, [(0, 0)])
    assert vq.signalled_used_valid  # 4: not past 5
    vhost_add_used_n(vq, [(1, 0), (2, 0)])
    assert not vq.signalled_used_valid and rig.tx.used_idx == 6


# -- interrupt suppression and kicks ------------------------------------------------------------


def send_tx(rig: Rig, count: int) -> None:
    for k in range(count):
        rig.tx.add_chain([frame(60, k)])


def drain_host(rig: Rig, count: int) -> None:
    rig.host.settimeout(5.0)
    for _ in range(count):
        rig.host.recv(4096)


@pytest.mark.timeout(20)
def test_tx_signals_only_when_the_guest_used_event_is_crossed(rig_factory) -> None:
    """EVENT_IDX: the first completion signals (nothing signalled yet); then the guest sets
    ``used_event`` ahead and completions short of it make no interrupt; crossing it does."""
    rig = rig_factory(EVENT_IDX)
    send_tx(rig, 1)
    handle_tx(rig.n)
    assert rig.tx_call.pending == 1 and rig.tx_call.test_and_clear()
    rig.tx.set_used_event(3)  # interrupt me when entry 3 is used (idx passes 3)
    send_tx(rig, 2)
    handle_tx(rig.n)
    assert rig.tx.used_idx == 3 and rig.tx_call.pending == 0
    send_tx(rig, 1)
    handle_tx(rig.n)
    assert rig.tx.used_idx == 4 and rig.tx_call.pending == 1
    drain_host(rig, 4)


@pytest.mark.timeout(20)
def test_tx_no_interrupt_flag_suppresses_the_signal_without_event_idx(rig_factory) -> None:
    rig = rig_factory(0)
    rig.tx.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    send_tx(rig, 3)
    handle_tx(rig.n)
    assert rig.tx.used_idx == 3 and rig.tx_call.pending == 0
    rig.tx.set_avail_flags(0)
    send_tx(rig, 1)
    handle_tx(rig.n)
    assert rig.tx_call.pending == 1
    drain_host(rig, 4)


@pytest.mark.timeout(20)
def test_tx_asks_for_the_next_kick_at_avail_event_once_the_ring_is_empty(rig_factory
                                                                        ) -> None:
    """EVENT_IDX: once handle_tx has emptied the ring it publishes ``avail_event`` at the
    avail index it got to, so the guest's next frame kicks and none before; the used flags
    are left alone (NO_NOTIFY is never written with EVENT_IDX)."""
    rig = rig_factory(EVENT_IDX)
    send_tx(rig, 3)
    handle_tx(rig.n)
    assert rig.tx.avail_event == 3 and rig.tx.used_flags == 0
    old = rig.tx.avail_idx
    send_tx(rig, 1)
    assert vring_need_event(rig.tx.avail_event, rig.tx.avail_idx, old)  # the guest kicks
    old = rig.tx.avail_idx
    send_tx(rig, 1)
    assert not vring_need_event(rig.tx.avail_event, rig.tx.avail_idx, old)  # and not again
    drain_host(rig, 3)


@pytest.mark.timeout(20)
def test_tx_keeps_kicks_off_while_the_tap_is_full_and_on_once_drained(rig_factory) -> None:
    """Without EVENT_IDX: a tap that would block leaves VRING_USED_F_NO_NOTIFY set (the
    tap's POLLOUT, not a kick, resumes the queue); a pass that empties the ring clears it."""
    rig = rig_factory(0)
    rig.host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    sent = 0
    deadline = time.monotonic() + 10
    while not rig.n.vqs[VHOST_NET_VQ_TX].would_block and time.monotonic() < deadline:
        if rig.tx.avail_idx - rig.tx.used_idx < NUM - 1:
            send_tx(rig, 1)
            sent += 1
        handle_tx(rig.n)
    assert rig.n.vqs[VHOST_NET_VQ_TX].would_block
    assert rig.tx.used_flags & VRING_USED_F_NO_NOTIFY
    rig.host.setblocking(False)
    while rig.tx.used_idx != sent and time.monotonic() < deadline:
        try:
            while True:
                rig.host.recv(4096)
        except BlockingIOError:
            pass
        handle_tx(rig.n)
    assert rig.tx.used_idx == sent
    assert not rig.tx.used_flags & VRING_USED_F_NO_NOTIFY
