"""vreplica fuzz --ring vhost-user: the hostile guest of vreplica.fuzz against the vhost-user
backend's ring code (vhostuserproc: libvhost-user's split virtqueue under vhost-user-bridge's
device), in process.

Guest RAM is a segment the fuzzer maps as the front-end and hands over as a front-end does
(SET_MEM_TABLE with its fd, the rings at the front-end's addresses); queue 0 is the receive
queue, 1 the transmit queue, at the machine's ring places, written through the driver-side
ring mock (common/vring_mock.py) with the machine's draws. After every step:

* nothing raised (a step returns: the backend's loops are bounded by the ring);
* a broken device says why (``vu_panic`` with a reason) and does nothing more: its used
  indices stay where they were;
* chains a well-behaved driver writes on a clean ring are used with their ids, and their
  bytes (after the vnet header) reach the host side; a frame from the host side lands in
  the receive buffers a well-behaved driver gave.

Reconnecting (``vu_deinit`` and the protocol again) gives a broken device a fresh start.
"""

from __future__ import annotations

import os
import secrets
import socket

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from common.guest_memory import GuestMemory
from common.vhost_user_abi import (
    U64,
    VRING_ADDR,
    VRING_STATE,
    VhostUserMemoryRegion,
    VhostUserMsg,
    VhostUserRequest,
    pack_memory,
)
from common.virtio_abi import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from common.vring import VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE, VRING_DESC_SIZE
from common.vring_mock import MockSplitQueue
from vhostuserproc.libvhost_user import vu_deinit, vu_dispatch
from vhostuserproc.vhost_user_bridge import VubrDev
from vhostuserproc.vu_dev import VuDev
from vreplica.fuzz.machine import (
    ADDRS,
    CHAIN_ARGS,
    DATA_BASE,
    RAM_SIZE,
    RAW_DESC,
    pack_table,
    ring_base,
    stats,
    u16s,
)

QVA = 0x7F55_0000_0000
"""Where the fuzzer, as front-end, says it has guest RAM mapped."""
R = VhostUserRequest
WHICH = st.integers(0, 1)


class RecordingHost:
    """The host side: keeps each frame the device sends, vnet header stripped."""

    with_hdr = False

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def set_vnet_hdr_len(self, length: int) -> None:
        pass

    def send(self, pair: int, sg: list[memoryview], hdrlen: int) -> bool:
        self.frames.append(b"".join(bytes(m) for m in sg)[hdrlen:])
        return True


class VhostUserBackendFuzz(RuleBasedStateMachine):
    """The guest (and so the rings the front-end names) is hostile; the backend must hold."""

    def __init__(self) -> None:
        super().__init__()
        name = f"/vnrfuzz.{os.getpid()}.{secrets.token_hex(4)}"
        self.mem = GuestMemory(name, RAM_SIZE, create=True)
        self.fd = os.open(f"/dev/shm{name}", os.O_RDWR | os.O_CLOEXEC)
        GuestMemory.unlink(name)  # nothing stays in /dev/shm
        self.ram = self.mem.ram
        self.host = RecordingHost()
        self.vubr = VubrDev(1, self.host)
        self.sock, self.peer = socket.socketpair()
        self.eventfds: list[int] = []
        self.dev: VuDev | None = None
        self.clean = True
        self.panics: list[str] = []
        stats["examples"] += 1

    @initialize(num=st.sampled_from((4, 8, 16)), mrg=st.booleans(), event_idx=st.booleans(),
                indirect=st.booleans())
    def setup(self, num: int, mrg: bool, event_idx: bool, indirect: bool) -> None:
        self.num = num
        self.features = (1 << VIRTIO_F_VERSION_1 | mrg << VIRTIO_NET_F_MRG_RXBUF
                         | event_idx << VIRTIO_RING_F_EVENT_IDX
                         | indirect << VIRTIO_RING_F_INDIRECT_DESC)
        self.drivers = [MockSplitQueue(self.mem, num, ring_base(i)) for i in range(2)]
        self.connect()

    def send(self, req: int, payload: bytes, fds: list[int] | None = None) -> None:
        assert self.dev is not None
        vu_dispatch(self.dev, VhostUserMsg(req, 1, payload, fds or []))

    def connect(self) -> None:
        """A front-end's start: features, memory table, then each queue's ring and fds."""
        self.dev = dev = VuDev(2, self.sock, lambda d, m: self.panics.append(m),
                               lambda *a: None, lambda fd: None, self.vubr)
        self.vubr.vudev = dev
        self.ram[:] = bytes(RAM_SIZE)
        self.host.frames.clear()
        self.clean = True
        self.send(R.SET_FEATURES, U64.pack(self.features))
        region = VhostUserMemoryRegion(0, RAM_SIZE, QVA, 0)
        self.send(R.SET_MEM_TABLE, pack_memory([region]), [os.dup(self.fd)])
        for index, d in enumerate(self.drivers):
            lay = d.layout
            self.send(R.SET_VRING_NUM, VRING_STATE.pack(index, self.num))
            self.send(R.SET_VRING_ADDR, VRING_ADDR.pack(index, 0, QVA + lay.desc,
                                                        QVA + lay.used, QVA + lay.avail, 0))
            self.send(R.SET_VRING_BASE, VRING_STATE.pack(index, 0))
            for req in (R.SET_VRING_CALL, R.SET_VRING_KICK):
                self.send(req, U64.pack(index), [os.eventfd(0, os.EFD_NONBLOCK)])
            self.send(R.SET_VRING_ENABLE, VRING_STATE.pack(index, 1))
        assert not dev.broken, self.panics

    def teardown(self) -> None:
        if self.dev is not None:
            vu_deinit(self.dev)
        for d in getattr(self, "drivers", []):
            d.release()
        self.mem.close()
        os.close(self.fd)
        self.sock.close()
        self.peer.close()

    # -- what a hostile guest writes -----------------------------------------------------------

    def dirty(self) -> None:
        self.clean = False

    @rule(which=WHICH, i=st.integers(0, 15), d=RAW_DESC)
    def write_desc(self, which: int, i: int, d: tuple[int, int, int, int]) -> None:
        self.drivers[which].write_desc(i, *d)
        self.dirty()

    @rule(which=WHICH, slot=st.integers(0, 15), head=u16s())
    def write_avail_entry(self, which: int, slot: int, head: int) -> None:
        d = self.drivers[which]
        d.u16(d.layout.avail + 4 + 2 * (slot % self.num), head)
        self.dirty()

    @rule(which=WHICH, delta=u16s())
    def move_avail_idx(self, which: int, delta: int) -> None:
        d = self.drivers[which]
        d.u16(d.layout.avail + 2, d.avail_idx + delta)
        self.dirty()

    @rule(which=WHICH, flags=u16s(), used_event=u16s())
    def write_avail_flags_and_used_event(self, which: int, flags: int, used_event: int) -> None:
        d = self.drivers[which]
        d.u16(d.layout.avail, flags)
        d.u16(d.layout.used_event, used_event)

    @rule(addr=st.integers(DATA_BASE, RAM_SIZE - 16 * VRING_DESC_SIZE),
          entries=st.lists(RAW_DESC, min_size=1, max_size=5), which=WHICH,
          head=st.integers(0, 15), length=st.one_of(st.just(-1), st.integers(0, 2**32 - 1)),
          where=st.one_of(st.just(-1), ADDRS))
    def publish_indirect(self, addr: int, entries: list[tuple[int, int, int, int]], which: int,
                         head: int, length: int, where: int) -> None:
        for k, (a, ln, f, n) in enumerate(entries):
            self.ram[addr + 16 * k : addr + 16 * k + 16] = \
                a.to_bytes(8, "little") + ln.to_bytes(4, "little") + \
                (f & 0xFFFF).to_bytes(2, "little") + (n & 0xFFFF).to_bytes(2, "little")
        d = self.drivers[which]
        d.write_desc(head, addr if where < 0 else where,
                     16 * len(entries) if length < 0 else length, VRING_DESC_F_INDIRECT, 0)
        d.publish_heads([head])
        self.dirty()

    @rule(addr=st.integers(0, RAM_SIZE - 1), data=st.binary(min_size=1, max_size=64))
    def scribble(self, addr: int, data: bytes) -> None:
        self.ram[addr : addr + len(data[: RAM_SIZE - addr])] = data[: RAM_SIZE - addr]
        self.dirty()

    @rule(**CHAIN_ARGS)
    def publish_chain(self, which: int, first: int, descs: list[tuple[int, int, int, int]],
                      kick: bool, copies: int, linked: bool) -> None:
        d = self.drivers[which % 2]
        for k, (a, ln, f, n) in enumerate(descs):
            d.write_desc(first + k, a, ln, f, (first + k + 1) % self.num if linked else n)
        d.publish_heads([first % self.num] * copies)
        self.dirty()
        if kick:
            self.kick(which % 2)

    # -- the backend at work -------------------------------------------------------------------

    @rule(which=WHICH)
    def kick(self, which: int) -> None:
        assert self.dev is not None
        stats["steps"] += 1
        if which:
            self.vubr.vubr_handle_tx(self.dev, 1)
        else:
            self.vubr.vubr_handle_rx(self.dev, 0)

    @rule(size=st.one_of(st.integers(0, 64), st.integers(0, 1600)))
    def frame_from_host(self, size: int) -> None:
        self.vubr.vubr_receive(0, bytes(range(256)) * (size // 256) + bytes(size % 256),
                               False)

    @rule()
    def reconnect(self) -> None:
        """The front-end goes and comes back: everything from the protocol again."""
        assert self.dev is not None
        stats["resets"] += 1
        vu_deinit(self.dev)
        self.connect()

    @rule(sizes=st.lists(st.integers(1, 200), min_size=1, max_size=4),
          indirect=st.booleans())
    def valid_tx(self, sizes: list[int], indirect: bool) -> None:
        """Well-formed chains (header and payload in two buffers, or through an indirect
        table) on a clean ring: used with their ids, each payload at the host side."""
        dev = self.dev
        assert dev is not None
        if not self.clean or dev.broken:
            return
        indirect = indirect and bool(self.features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        d = self.drivers[1]
        hdrlen = self.vubr.hdrlen
        before = len(self.host.frames)
        used0 = d.used_idx
        heads, want = [], []
        for k, size in enumerate(sizes[: self.num // 2]):
            base = DATA_BASE + 1024 * k
            payload = bytes([k + 1]) * size
            self.ram[base : base + hdrlen] = bytes(hdrlen)
            self.ram[base + 256 : base + 256 + size] = payload
            pieces = [(base, hdrlen), (base + 256, size)]
            head = (d.avail_idx + 2 * k) % self.num
            if indirect:
                table = base + 512
                pack_table(self.ram, table, pieces, 0)
                d.write_desc(head, table, 2 * VRING_DESC_SIZE, VRING_DESC_F_INDIRECT, 0)
            else:
                d.write_desc(head, base, hdrlen, 1, (head + 1) % self.num)
                d.write_desc(head + 1, base + 256, size, 0, 0)
            heads.append(head)
            want.append(payload)
        d.publish_heads(heads)
        self.kick(1)
        assert not dev.broken, self.panics
        assert self.host.frames[before:] == want
        assert [d.used_elem(used0 + k)[0] for k in range(len(heads))] == heads
        stats["tx_frames"] += len(want)

    @rule(cap=st.integers(12, 100), size=st.integers(14, 300))
    def valid_rx(self, cap: int, size: int) -> None:
        """Receive buffers of ``cap`` bytes on a clean ring; a frame of ``size`` bytes goes
        in whole (MRG_RXBUF: across as many as it takes, num_buffers saying how many) or,
        without it, fills one buffer."""
        dev = self.dev
        assert dev is not None
        if not self.clean or dev.broken:
            return
        d = self.drivers[0]
        hdrlen = self.vubr.hdrlen
        mrg = bool(self.features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        n = self.num
        used0, idx0 = d.used_idx, d.avail_idx
        bases = [DATA_BASE + 512 * k for k in range(n)]
        for k in range(n):
            d.write_desc((idx0 + k) % n, bases[k], cap, VRING_DESC_F_WRITE, 0)
        d.publish_heads([(idx0 + k) % n for k in range(n)])
        frame = bytes((i * 7) & 0xFF for i in range(size))
        took = self.vubr.vubr_receive(0, frame, False)
        assert not dev.broken, self.panics
        if not took:  # too little room for the whole frame: nothing used
            assert d.used_idx == used0 and (mrg and cap * n < size + hdrlen or cap < hdrlen)
            self.dirty()  # the buffers stay posted
            return
        got = b""
        k = 0
        while (d.used_idx - used0 - k) & 0xFFFF:
            head, length = d.used_elem(used0 + k)
            pos = (head - idx0) % n
            got += bytes(self.ram[bases[pos] : bases[pos] + length])
            k += 1
        if mrg:
            assert int.from_bytes(got[10:12], "little") == k
        assert got[hdrlen:] == (frame if mrg else frame[: cap - hdrlen])
        stats["rx_frames"] += 1
        self.dirty()  # the rest of the posted buffers stay in the ring

    # -- the properties ------------------------------------------------------------------------

    @invariant()
    def broken_says_why_and_stays_still(self) -> None:
        dev = self.dev
        if dev is None:
            return
        if dev.broken:
            assert self.panics and dev.panic_reason
            stats["errors"] += 1
            stats["messages"].add(dev.panic_reason.split(":")[0][:40])
            used = [d.used_idx for d in self.drivers]
            self.kick(0)
            self.kick(1)
            self.vubr.vubr_receive(0, b"\0" * 60, False)
            assert [d.used_idx for d in self.drivers] == used


