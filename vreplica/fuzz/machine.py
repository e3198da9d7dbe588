"""vreplica fuzz: a hostile guest against the real device code, for as long as asked.

A hypothesis state machine plays the guest: it writes anything into its rings and RAM
(descriptors with any addr/len/flags/next, avail entries and index, used_event, indirect
tables, raw bytes over the rings, bogus queue PFNs), kicks queues, feeds frames from the
backend, pops without pushing, and resets the device. The device is a real ``VirtIONet``
(qemuproc) on a real ``GuestMemory`` segment, with a recording net backend. After every
step:

* nothing raised, and the device went quiet within a bounded number of bottom halves;
* every access the device made went through the bounds-checked accessor and lay inside
  guest RAM (the accessor is instrumented);
* a broken device says so: NEEDS_RESET in its status, a message, a config interrupt to a
  driver that had set DRIVER_OK; a reset makes it work again;
* chains a well-behaved driver writes on a clean ring come out in the used ring with their
  ids, and their bytes reach the backend (TX) or the guest's buffers (RX).

``tests/test_fuzz.py`` runs it with a small budget; ``./run.sh fuzz --examples N`` with any.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from common.guest_memory import GuestMemory, GuestMemoryError
from common.virtio_abi import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_RING_PACKED,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_HDR_MRG_RXBUF,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from common.vring import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
)
from common.vring_mock import MockSplitQueue
from qemuproc.aio import aio_bh_poll, aio_compute_timeout, qemu_bh_delete, qemu_get_aio_context
from qemuproc.main_loop import MainLoop
from qemuproc.net import NetClientInfo, qemu_new_net_client, qemu_sendv_packet_async
from qemuproc.virtio import (
    VirtQueueElement,
    virtio_queue_notify,
    virtio_queue_set_addr,
    virtio_reset,
    virtio_set_features,
    virtio_set_status,
    virtqueue_pop,
    virtqueue_push,
)
from qemuproc.virtio_net import VirtIONet, virtio_net_device_init

PAGE = 4096
RAM_SIZE = 128 << 10
RING_PAGES = 2  # a ring of up to 16 entries: desc + avail in one page, used in the next
DATA_BASE = 11 * PAGE  # after five rings (RX0, TX0, RX1, TX1, CTRL) from page 1
MAX_BH_RUNS = 16
STEP_BOUND_S = 5.0
CONFIG_VECTOR = 0
STATS_KEYS = ("examples", "steps", "errors", "resets", "tx_frames", "rx_frames", "maps",
              "refused")
stats: dict[str, Any] = dict.fromkeys(STATS_KEYS, 0) | {"messages": set()}


class RecordingGuestMemory(GuestMemory):
    """Guest RAM whose accessor notes every request and any answer outside the segment."""

    __slots__ = ("maps", "refused", "violations")

    def address_space_map(self, addr: int, length: int) -> memoryview:
        try:
            view = super().address_space_map(addr, length)
        except GuestMemoryError:
            self.refused += 1
            raise
        self.maps += 1
        if not (0 <= addr and addr + length <= self.size and len(view) == length):
            self.violations.append((addr, length, len(view)))
        return view


_memory: RecordingGuestMemory | None = None


def fuzz_memory() -> RecordingGuestMemory:
    """One segment for the whole process, unlinked at once: nothing stays in /dev/shm."""
    global _memory
    if _memory is None:
        name = f"/vnrfuzz.{os.getpid()}.{secrets.token_hex(4)}"
        mem = RecordingGuestMemory(name, RAM_SIZE, create=True)
        GuestMemory.unlink(name)
        mem.maps = mem.refused = 0
        mem.violations = []
        _memory = mem
    return _memory


def u16s() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF))


ADDRS = st.one_of(st.integers(0, RAM_SIZE - 1), st.integers(RAM_SIZE - 64, RAM_SIZE + 64),
                  st.sampled_from([0, 2**63, 2**64 - 1, 2**64 - 16]), st.integers(0, 2**64 - 1))
LENS = st.one_of(st.integers(0, 64), st.sampled_from([0, 1, 10, 12, 16, 32, 2**32 - 1]),
                 st.integers(0, 2**32 - 1))
FLAGS = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
RAW_DESC = st.tuples(ADDRS, LENS, FLAGS, u16s())
PLAUSIBLE_DESC = st.tuples(
    st.one_of(st.integers(DATA_BASE, RAM_SIZE - 256), ADDRS),
    st.one_of(st.integers(1, 64), LENS),
    st.one_of(st.sampled_from([0, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                               VRING_DESC_F_NEXT | VRING_DESC_F_WRITE]), FLAGS),
    st.one_of(st.integers(0, 4), st.integers(0, 17), u16s()))
"""Descriptors a buggy driver writes: mostly near-valid, so the device walks deep into them."""

CHAIN_ARGS = {"which": st.integers(0, 4), "first": st.integers(0, 15),
              "descs": st.lists(PLAUSIBLE_DESC, min_size=1, max_size=4), "kick": st.booleans(),
              "copies": st.one_of(st.just(1), st.integers(1, 18)), "linked": st.booleans()}
INDIRECT_ARGS = {"which": st.integers(0, 4), "head": st.integers(0, 15),
                 "entries": st.lists(PLAUSIBLE_DESC, min_size=0, max_size=5),
                 "length": st.one_of(st.just(-1), st.integers(0, 100),
                                     st.integers(0, 2**32 - 1)),
                 "where": st.one_of(st.just(-1), ADDRS),
                 "flags": st.sampled_from([0, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE])}
VALID_TX_ARGS = {"chains": st.lists(st.tuples(st.integers(1, 3), st.booleans(),
                                              st.integers(1, 200)), min_size=1, max_size=4)}
VALID_RX_ARGS = {"cap": st.integers(0, 100), "size": st.integers(14, 300),
                 "split": st.booleans(), "indirect": st.booleans()}
"""The rules' draws, which the split and the packed machines share."""


def ring_base(index: int) -> int:
    """Where queue ``index``'s ring lies: RING_PAGES pages each, from page 1."""
    return PAGE * (1 + RING_PAGES * index)


def pack_table(ram: memoryview, table: int, pieces: list[tuple[int, int]], flags: int) -> None:
    """An indirect table at ``table`` as a driver writes it: ``pieces`` (addr, len) chained
    by NEXT in order, each with ``flags``."""
    for k, (a, ln) in enumerate(pieces):
        last = k == len(pieces) - 1
        DESC.pack_into(ram, table + VRING_DESC_SIZE * k, a, ln,
                       flags | (0 if last else VRING_DESC_F_NEXT), k + 1)


class VirtioNetFuzz(RuleBasedStateMachine):
    """The guest is hostile; the device must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.mem = fuzz_memory()
        self.ram = self.mem.ram
        self.ram[:] = bytes(RAM_SIZE)
        self.n: VirtIONet | None = None
        self.held: list[tuple[int, VirtQueueElement]] = []
        self.frames: list[bytes] = []
        self.irqs: list[int] = []
        self.clean = True
        stats["examples"] += 1

    # -- the device and a driver's handshake -------------------------------------------------

    @initialize(num=st.sampled_from((4, 8, 16)), mrg=st.booleans(), event_idx=st.booleans(),
                indirect=st.booleans(), queues=st.sampled_from((1, 2)))
    def setup(self, num: int, mrg: bool, event_idx: bool, indirect: bool, queues: int) -> None:
        self.num = num
        backend = qemu_new_net_client(NetClientInfo("fuzz", self.backend_receive), None,
                                      "fuzz", "fuzz0")
        n = VirtIONet(self.mem, MainLoop(), queue_size=num, mrg_rxbuf=mrg, event_idx=event_idx,
                      indirect_desc=indirect, queues=queues)
        virtio_net_device_init(n, backend)
        n.notify_vector = self.irqs.append
        n.on_error = self.on_error
        self.n = n
        self.backend = backend
        self.rings = [MockSplitQueue(self.mem, vq.num, ring_base(i)) for i, vq in enumerate(n.vq)]
        self.driver_init()

    def backend_receive(self, nc: Any, buf: Any) -> int:
        self.frames.append(bytes(buf))
        stats["tx_frames"] += 1
        return len(buf)

    def on_error(self, message: str) -> None:
        stats["errors"] += 1
        stats["messages"].add(re.sub(r"\b[0-9a-f]*\d[0-9a-f]*\b", "N", message))

    def driver_init(self) -> None:
        """Reset, zeroed rings, the handshake, DRIVER_OK: what virtnet_probe makes."""
        n = self.n
        assert n is not None
        virtio_reset(n)
        assert not n.broken and n.status == 0, "a reset must make the device usable again"
        for r in self.rings:
            self.ram[r.base : r.base + RING_PAGES * PAGE] = bytes(RING_PAGES * PAGE)
        features = n.host_features & ~((1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CTRL_VQ)) \
            if len(n.vq) == 2 else n.host_features
        virtio_set_status(n, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        assert virtio_set_features(n, features) == 0
        virtio_set_status(n, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                          | VIRTIO_CONFIG_S_FEATURES_OK)
        n.config_vector = CONFIG_VECTOR
        for i, r in enumerate(self.rings):
            self.place_ring(i, r)
            n.vq[i].vector = 1 + i
        virtio_set_status(n, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                          | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
        self.held.clear()
        self.frames.clear()
        self.irqs.clear()
        self.clean = True
        self.run_bottom_halves()

    def place_ring(self, i: int, r: Any) -> None:
        """Give queue ``i`` its ring, as the transport's queue registers do (legacy PFN)."""
        assert self.n is not None
        virtio_queue_set_addr(self.n, i, r.base)

    def teardown(self) -> None:
        if self.n is not None:
            for q in self.n.vqs:
                if q.tx_bh is not None:
                    qemu_bh_delete(q.tx_bh)
            aio_bh_poll(qemu_get_aio_context())  # frees the deleted bhs; runs no callback
        stats["maps"] = self.mem.maps
        stats["refused"] = self.mem.refused

    def run_bottom_halves(self) -> None:
        """The main loop, for as long as the device has work; it must run out of it."""
        ctx = qemu_get_aio_context()
        t0 = time.monotonic()
        for _ in range(MAX_BH_RUNS):
            if aio_compute_timeout(ctx) != 0:  # no bh scheduled
                break
            aio_bh_poll(ctx)
        assert aio_compute_timeout(ctx) != 0, \
            "the device is still busy after a bounded number of bottom halves"
        assert time.monotonic() - t0 < STEP_BOUND_S

    def ring(self, which: int) -> int:
        assert self.n is not None
        return which % len(self.n.vq)

    # -- a hostile guest ---------------------------------------------------------------------

    @rule(which=st.integers(0, 4), i=st.integers(0, 15), d=RAW_DESC)
    def write_desc(self, which: int, i: int, d: tuple[int, int, int, int]) -> None:
        self.rings[self.ring(which)].write_desc(i, *d)
        self.clean = False

    @rule(which=st.integers(0, 4), slot=st.integers(0, 15),
          head=st.one_of(st.integers(0, 17), st.integers(0, 0xFFFF)))
    def write_avail_entry(self, which: int, slot: int, head: int) -> None:
        r = self.rings[self.ring(which)]
        r.u16(r.layout.avail + 4 + 2 * (slot % r.num), head)
        self.clean = False

    @rule(which=st.integers(0, 4), delta=u16s())
    def move_avail_idx(self, which: int, delta: int) -> None:
        r = self.rings[self.ring(which)]
        r.u16(r.layout.avail + 2, r.avail_idx + delta)
        self.clean = False

    @rule(which=st.integers(0, 4), flags=u16s(), used_event=u16s())
    def write_avail_flags_and_used_event(self, which: int, flags: int, used_event: int) -> None:
        r = self.rings[self.ring(which)]
        r.u16(r.layout.avail, flags)
        r.u16(r.layout.used_event, used_event)

    @rule(addr=st.integers(0, RAM_SIZE - VRING_DESC_SIZE),
          entries=st.lists(RAW_DESC, min_size=1, max_size=6))
    def write_indirect_table(self, addr: int, entries: list[tuple[int, int, int, int]]) -> None:
        for k, e in enumerate(entries):
            at = addr + k * VRING_DESC_SIZE
            if at + VRING_DESC_SIZE <= RAM_SIZE:
                DESC.pack_into(self.ram, at, *e)
        self.clean = False

    @rule(addr=st.integers(0, RAM_SIZE - 1), data=st.binary(min_size=1, max_size=64))
    def scribble(self, addr: int, data: bytes) -> None:
        data = data[: RAM_SIZE - addr]
        self.ram[addr : addr + len(data)] = data
        self.clean = False

    @rule(which=st.integers(0, 4), pfn=st.one_of(st.integers(0, RAM_SIZE // PAGE + 4),
                                                 st.integers(0, 2**20)))
    def write_queue_pfn(self, which: int, pfn: int) -> None:
        assert self.n is not None
        q = self.ring(which)
        virtio_queue_set_addr(self.n, q, pfn << 12)
        self.clean = False
        if pfn == 0:
            self.driver_init()  # legacy: PFN 0 resets the device (virtio_pci_reset)

    @rule(**CHAIN_ARGS)
    def publish_chain(self, which: int, first: int, descs: list[tuple[int, int, int, int]],
                      kick: bool, copies: int, linked: bool) -> None:
        """Write a chain of (mostly near-valid) descriptors and offer its head, as a driver
        (``copies`` times: the same head again while it may be in flight). ``linked``: NEXT
        and next as a driver sets them, the rest of the fields as drawn."""
        r = self.rings[self.ring(which)]
        for k, (addr, length, flags, nxt) in enumerate(descs):
            if linked:
                last = k == len(descs) - 1
                flags = flags & ~VRING_DESC_F_NEXT | (0 if last else VRING_DESC_F_NEXT)
                nxt = (first + k + 1) % r.num
            r.write_desc(first + k, addr, length, flags, nxt)
        r.publish_heads([first % r.num] * copies)
        self.clean = False
        if kick:
            self.kick(which)

    @rule(**INDIRECT_ARGS)
    def publish_indirect(self, which: int, head: int, entries: list[tuple[int, int, int, int]],
                         length: int, where: int, flags: int) -> None:
        """An indirect head (any length, any table address) over a table of near-valid
        entries, offered and kicked."""
        r = self.rings[self.ring(which)]
        table = DATA_BASE + 8 * PAGE
        for k, e in enumerate(entries):
            DESC.pack_into(self.ram, table + VRING_DESC_SIZE * k, *e)
        r.write_desc(head, table if where < 0 else where,
               VRING_DESC_SIZE * len(entries) if length < 0 else length,
               VRING_DESC_F_INDIRECT | flags, 0)
        r.publish_heads([head % r.num])
        self.clean = False
        self.kick(which)

    @rule(which=st.integers(0, 4))
    def kick(self, which: int) -> None:
        assert self.n is not None
        virtio_queue_notify(self.n, self.ring(which))
        self.run_bottom_halves()

    @rule(size=st.one_of(st.integers(0, 64), st.integers(0, 1600)))
    def frame_from_backend(self, size: int) -> None:
        qemu_sendv_packet_async(self.backend, [bytes(range(256)) * (size // 256) +
                                               bytes(size % 256)], None)
        self.run_bottom_halves()
        if self.n is not None and self.n.nic.incoming_queue.packets:
            self.clean = False  # a queued frame will take the next RX buffer

    @rule(which=st.integers(0, 4), times=st.integers(1, 17))
    def pop_and_hold(self, which: int, times: int) -> None:
        """A device path that keeps elements: inuse grows until 'Virtqueue size exceeded'."""
        assert self.n is not None
        q = self.ring(which)
        for _ in range(times):
            elem = virtqueue_pop(self.n.vq[q])
            if elem is None:
                break
            self.held.append((q, elem))
        self.clean = False

    @precondition(lambda self: bool(self.held))
    @rule()
    def push_held(self) -> None:
        assert self.n is not None
        for q, elem in self.held:
            virtqueue_push(self.n.vq[q], elem, 0)
        self.held.clear()

    @rule()
    def reset(self) -> None:
        stats["resets"] += 1
        self.driver_init()

    # -- a well-behaved driver ---------------------------------------------------------------

    @rule(**VALID_TX_ARGS)
    def valid_tx(self, chains: list[tuple[int, bool, int]]) -> None:
        """TX chains as virtio_net's xmit_skb writes them: what is used must be what was sent."""
        n = self.n
        assert n is not None
        r = self.rings[1]
        hdr = n.guest_hdr_len
        use_indirect = bool(n.guest_features & (1 << VIRTIO_RING_F_INDIRECT_DESC))
        data = DATA_BASE
        next_desc = 0
        heads, payloads = [], []
        for nbufs, indirect, size in chains:
            payload = bytes((size + k) & 0xFF for k in range(size))
            blob = bytes(hdr) + payload
            self.ram[data : data + len(blob)] = blob
            cuts = [0] + sorted({min(len(blob), max(1, hdr * k)) for k in range(1, nbufs)}) \
                + [len(blob)]
            pieces = [(data + a, b - a) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
            data += (len(blob) + 15) & ~15
            if indirect and use_indirect and len(pieces) > 1:
                table = data
                data += VRING_DESC_SIZE * len(pieces)
                pack_table(self.ram, table, pieces, 0)
                if next_desc + 1 > r.num:
                    break
                r.write_desc(next_desc, table, VRING_DESC_SIZE * len(pieces),
                             VRING_DESC_F_INDIRECT, 0)
                heads.append(next_desc)
                next_desc += 1
            else:
                if next_desc + len(pieces) > r.num:
                    break
                head = next_desc
                for k, (a, ln) in enumerate(pieces):
                    last = k == len(pieces) - 1
                    r.write_desc(next_desc, a, ln, 0 if last else VRING_DESC_F_NEXT, next_desc + 1)
                    next_desc += 1
                heads.append(head)
            payloads.append(payload)
        if not heads:
            return
        vq = n.vq[1]
        was_broken = n.broken
        # a backend that took 0 bytes (an empty frame) is off until its queue is flushed, and
        # nothing flushes a backend's own queue (QEMU 7.2's net layer): every frame waits
        stalled = self.backend.receive_disabled
        used_before = vq.used_idx
        sent_before = len(self.frames)
        r.publish_heads(heads)
        virtio_queue_notify(n, 1)
        self.run_bottom_halves()
        if was_broken:
            assert n.broken and vq.used_idx == used_before, "a broken device must stay quiet"
            return
        if stalled and not n.broken:
            assert vq.used_idx == used_before and len(self.frames) == sent_before
            return
        if n.broken:
            assert not self.clean, f"a valid TX chain on a clean ring was refused: " \
                                   f"{n.broken_reason}"
            return
        used = (vq.used_idx - used_before) & 0xFFFF
        got = [r.used_elem(vq.used_idx - used + k) for k in range(min(used, r.num))]
        assert all(g[0] < r.num for g in got), got
        if self.clean:  # nothing else was pending: exactly these chains, these bytes
            assert used == len(heads) and [g[0] for g in got] == heads, (got, heads)
            assert all(g[1] == 0 for g in got)
            assert self.frames[sent_before:] == payloads

    @rule(**VALID_RX_ARGS)
    def valid_rx(self, cap: int, size: int, split: bool, indirect: bool) -> None:
        """One RX chain with room for one frame; the frame must land in it, intact."""
        n = self.n
        assert n is not None
        r = self.rings[0]
        hdr = n.guest_hdr_len
        room = hdr + size + cap
        buf = DATA_BASE + 16 * PAGE
        self.ram[buf : buf + room] = bytes(room)
        pieces = [(buf, hdr), (buf + hdr, room - hdr)] if split else [(buf, room)]
        use_indirect = indirect and len(pieces) > 1 \
            and bool(n.guest_features & (1 << VIRTIO_RING_F_INDIRECT_DESC))
        head = (r.avail_idx * 3) % r.num  # any slot; a clean ring has nothing pending
        if use_indirect:
            table = buf + room + 16
            pack_table(self.ram, table, pieces, VRING_DESC_F_WRITE)
            r.write_desc(head, table, VRING_DESC_SIZE * len(pieces), VRING_DESC_F_INDIRECT, 0)
        else:
            i = head
            for k, (a, ln) in enumerate(pieces):
                last = k == len(pieces) - 1
                nxt = (i + 1) % r.num
                r.write_desc(i, a, ln, VRING_DESC_F_WRITE | (0 if last else VRING_DESC_F_NEXT), nxt)
                i = nxt
        was_broken = n.broken
        clean = self.clean and not n.nic.incoming_queue.packets and not self.held
        used_before = r.used_idx
        r.publish_heads([head])
        virtio_queue_notify(n, 0)
        frame = bytes((7 * k + size) & 0xFF for k in range(size))
        qemu_sendv_packet_async(self.backend, [frame], None)
        self.run_bottom_halves()
        if was_broken or not clean:
            self.clean = False
            return
        assert not n.broken, f"a valid RX chain on a clean ring was refused: {n.broken_reason}"
        assert (r.used_idx - used_before) & 0xFFFF == 1
        assert r.used_elem(used_before) == (head, hdr + size)
        assert bytes(self.ram[buf + hdr : buf + hdr + size]) == frame
        if n.mergeable_rx_bufs:
            num_buffers = VIRTIO_NET_HDR_MRG_RXBUF.unpack_from(self.ram, buf)[6]
            assert num_buffers == 1
        stats["rx_frames"] += 1

    # -- what must always hold ---------------------------------------------------------------

    @invariant()
    def only_guest_ram(self) -> None:
        assert not self.mem.violations, f"device access outside guest RAM: {self.mem.violations}"

    @invariant()
    def broken_is_reported(self) -> None:
        stats["steps"] += 1
        n = self.n
        if n is None:
            return
        packed = n.guest_features >> VIRTIO_F_RING_PACKED & 1
        for vq in n.vq:  # a packed chain popped at inuse < num may take num more positions
            assert 0 <= vq.inuse <= (2 * vq.num - 1 if packed else vq.num)
        if n.broken:
            assert n.status & VIRTIO_CONFIG_S_NEEDS_RESET and n.errors
            if n.status & VIRTIO_CONFIG_S_DRIVER_OK:
                assert CONFIG_VECTOR in self.irqs, "no config interrupt for NEEDS_RESET"


def fuzz_settings(examples: int, steps: int = 40) -> settings:
    return settings(max_examples=examples, deadline=None, stateful_step_count=steps,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])
