"""vreplica fuzz's hostile guest on packed rings (VIRTIO_F_RING_PACKED).

The machine of ``vreplica.fuzz.machine`` with the rings placed as a modern driver places packed ones
(``virtio_queue_set_rings``: descriptor ring, driver and device event structures) and the
ring rules replaced by their packed forms: descriptors with any addr/len/id/flags (the
AVAIL/USED bits included), chains made available in the driver's wrap or the wrong one, a
driver whose wrap counter slips, any driver event structure, any ring addresses. The
well-behaved driver (``valid_tx``/``valid_rx``) checks that what the device hands back on a
clean ring is what was offered: ids, lengths, used flags of the right wrap, bytes.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule

from common.virtio_abi import VIRTIO_RING_F_INDIRECT_DESC
from common.vring import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from common.vring_mock import MockPackedQueue
from common.vring_packed import (
    AVAIL_F,
    AVAIL_USED_F,
    PACKED_DESC,
    USED_F,
    VRING_PACKED_DESC_SIZE,
)
from qemuproc.main_loop import MainLoop
from qemuproc.net import NetClientInfo, qemu_new_net_client, qemu_sendv_packet_async
from qemuproc.virtio import virtio_queue_notify, virtio_queue_set_rings
from qemuproc.virtio_net import VirtIONet, virtio_net_device_init
from vreplica.fuzz.machine import (
    ADDRS,
    CHAIN_ARGS,
    DATA_BASE,
    INDIRECT_ARGS,
    PAGE,
    VALID_RX_ARGS,
    VALID_TX_ARGS,
    VirtioNetFuzz,
    ring_base,
    stats,
    u16s,
)


class VirtioNetPackedFuzz(VirtioNetFuzz):
    """The guest is hostile, its rings are packed; the device must hold."""

    @initialize(num=st.sampled_from((4, 8, 16)), mrg=st.booleans(), event_idx=st.booleans(),
                indirect=st.booleans(), queues=st.sampled_from((1, 2)))
    def setup(self, num: int, mrg: bool, event_idx: bool, indirect: bool, queues: int) -> None:
        self.num = num
        backend = qemu_new_net_client(NetClientInfo("fuzz", self.backend_receive), None,
                                      "fuzz", "fuzz0")
        n = VirtIONet(self.mem, MainLoop(), queue_size=num, mrg_rxbuf=mrg, event_idx=event_idx,
                      indirect_desc=indirect, queues=queues, packed=True)
        virtio_net_device_init(n, backend)
        n.notify_vector = self.irqs.append
        n.on_error = self.on_error
        self.n = n
        self.backend = backend
        self.rings = [MockPackedQueue(self.mem, vq.num, ring_base(i))  # type: ignore[misc]
                      for i, vq in enumerate(n.vq)]
        self.driver_init()

    def place_ring(self, i: int, r: MockPackedQueue) -> None:
        """Modern: the three areas' addresses; the driver starts over (wrap counters 1)."""
        assert self.n is not None
        self.rings[i] = r = MockPackedQueue(self.mem, r.num, r.base)  # type: ignore[call-overload]
        lay = r.layout
        virtio_queue_set_rings(self.n, i, lay.desc, lay.driver, lay.device)

    # -- the packed forms of the ring rules ----------------------------------------------------

    @rule(which=st.integers(0, 4), pos=st.integers(0, 15), wrap=st.booleans(),
          garbage=st.one_of(st.none(), u16s()))
    def write_avail_entry(self, which: int, pos: int, wrap: bool, garbage: int | None) -> None:
        """Make a ring position available in a wrap (the driver's or not), or give its flags
        any value."""
        r = self.rings[self.ring(which)]
        _, _, _, flags = r.read_desc(pos % r.num)  # type: ignore[attr-defined]
        new = (flags & ~AVAIL_USED_F) | (AVAIL_F if wrap else USED_F) if garbage is None \
            else garbage
        r.set_flags(pos, new)  # type: ignore[attr-defined]
        self.clean = False

    @rule(which=st.integers(0, 4), slip=st.integers(1, 17))
    def move_avail_idx(self, which: int, slip: int) -> None:
        """The driver's next_avail and wrap counter slip: later chains land where the device
        does not look, or look available in the wrong wrap."""
        r = self.rings[self.ring(which)]
        r.next_avail = (r.next_avail + slip) % r.num  # type: ignore[attr-defined]
        if slip % 2:
            r.wrap = not r.wrap  # type: ignore[attr-defined]
        self.clean = False

    @rule(which=st.integers(0, 4), flags=u16s(), off_wrap=u16s())
    def write_avail_flags_and_used_event(self, which: int, flags: int, off_wrap: int) -> None:
        """Any driver event structure (the device's interrupt suppression)."""
        r = self.rings[self.ring(which)]
        drv = r.layout.driver  # type: ignore[attr-defined]
        self.ram[drv : drv + 4] = (off_wrap & 0xFFFF).to_bytes(2, "little") + \
            (flags & 0xFFFF).to_bytes(2, "little")

    @rule(which=st.integers(0, 4), desc=ADDRS, driver=ADDRS, device=ADDRS)
    def write_queue_pfn(self, which: int, desc: int, driver: int, device: int) -> None:
        """queue_desc/driver/device anywhere (modern registers, 64 bits each)."""
        assert self.n is not None
        virtio_queue_set_rings(self.n, self.ring(which), desc, driver, device)
        self.clean = False

    @rule(**CHAIN_ARGS)
    def publish_chain(self, which: int, first: int, descs: list[tuple[int, int, int, int]],
                      kick: bool, copies: int, linked: bool) -> None:
        """Near-valid descriptors offered from next_avail (``copies`` times); ``linked``: NEXT
        as a driver sets it, else as drawn."""
        r = self.rings[self.ring(which)]
        for _ in range(min(copies, 4)):
            chain = []
            for k, (addr, length, flags, _) in enumerate(descs):
                if linked:
                    last = k == len(descs) - 1
                    flags = flags & ~VRING_DESC_F_NEXT | (0 if last else VRING_DESC_F_NEXT)
                chain.append((addr, length, flags))
            r.offer_next(chain)  # type: ignore[attr-defined]
        self.clean = False
        if kick:
            self.kick(which)

    @rule(**INDIRECT_ARGS)
    def publish_indirect(self, which: int, head: int, entries: list[tuple[int, int, int, int]],
                         length: int, where: int, flags: int) -> None:
        r = self.rings[self.ring(which)]
        table = DATA_BASE + 8 * PAGE
        for k, (a, ln, f, _) in enumerate(entries):
            PACKED_DESC.pack_into(self.ram, table + VRING_PACKED_DESC_SIZE * k, a, ln, 0, f)
        r.offer_next([(table if where < 0 else where,  # type: ignore[attr-defined]
                  VRING_PACKED_DESC_SIZE * len(entries) if length < 0 else length,
                  VRING_DESC_F_INDIRECT | flags)])
        self.clean = False
        self.kick(which)

    # -- a well-behaved driver ---------------------------------------------------------------

    @rule(**VALID_TX_ARGS, rounds=st.integers(1, 6))
    def valid_tx(self, chains: list[tuple[int, bool, int]], rounds: int = 1) -> None:
        """TX chains as virtqueue_add_packed writes them, ``rounds`` times (the ring wraps):
        what comes back used, in the used wrap, is each chain's id, and what reached the
        backend is what was sent."""
        for _ in range(rounds):
            self.valid_tx_round(chains)

    def valid_tx_round(self, chains: list[tuple[int, bool, int]]) -> None:
        n = self.n
        assert n is not None
        r: MockPackedQueue = self.rings[1]  # type: ignore[assignment]
        hdr = n.guest_hdr_len
        use_indirect = n.guest_features >> VIRTIO_RING_F_INDIRECT_DESC & 1
        data = DATA_BASE
        offered: list[tuple[int, int]] = []
        payloads = []
        room = r.num
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
                data += VRING_PACKED_DESC_SIZE * len(pieces)
                for k, (a, ln) in enumerate(pieces):
                    PACKED_DESC.pack_into(self.ram, table + VRING_PACKED_DESC_SIZE * k, a, ln,
                                          0, 0)
                descs = [(table, VRING_PACKED_DESC_SIZE * len(pieces), VRING_DESC_F_INDIRECT)]
            else:
                descs = [(a, ln, 0 if k == len(pieces) - 1 else VRING_DESC_F_NEXT)
                         for k, (a, ln) in enumerate(pieces)]
            if len(descs) > room:
                break
            room -= len(descs)
            offered.append(r.offer_next(descs))
            payloads.append(payload)
        if not offered:
            return
        was_broken = n.broken
        sent_before = len(self.frames)
        virtio_queue_notify(n, 1)
        self.run_bottom_halves()
        if was_broken or n.broken:
            assert not (n.broken and self.clean and not was_broken), \
                f"a valid TX chain on a clean ring was refused: {n.broken_reason}"
            self.clean = False
            return
        if not self.clean:
            return
        got = [r.take_used(ndescs) for _, ndescs in offered]
        assert got == [(buf_id, 0) for buf_id, _ in offered], (got, offered)
        assert self.frames[sent_before:] == payloads

    @rule(**VALID_RX_ARGS)
    def valid_rx(self, cap: int, size: int, split: bool, indirect: bool) -> None:
        """One writable chain with room for one frame: the frame lands in it, and the used
        descriptor at last_used names its id and the bytes written."""
        n = self.n
        assert n is not None
        r: MockPackedQueue = self.rings[0]  # type: ignore[assignment]
        hdr = n.guest_hdr_len
        room = hdr + size + cap
        buf = DATA_BASE + 16 * PAGE
        self.ram[buf : buf + room] = bytes(room)
        pieces = [(buf, hdr), (buf + hdr, room - hdr)] if split else [(buf, room)]
        if indirect and len(pieces) > 1 and n.guest_features >> VIRTIO_RING_F_INDIRECT_DESC & 1:
            table = buf + room + 16
            for k, (a, ln) in enumerate(pieces):
                PACKED_DESC.pack_into(self.ram, table + VRING_PACKED_DESC_SIZE * k, a, ln, 0,
                                      VRING_DESC_F_WRITE)
            descs = [(table, VRING_PACKED_DESC_SIZE * len(pieces), VRING_DESC_F_INDIRECT)]
        else:
            descs = [(a, ln, VRING_DESC_F_WRITE | (0 if k == len(pieces) - 1
                                                   else VRING_DESC_F_NEXT))
                     for k, (a, ln) in enumerate(pieces)]
        was_broken = n.broken
        clean = self.clean and not n.nic.incoming_queue.packets and not self.held
        buf_id, ndescs = r.offer_next(descs)
        virtio_queue_notify(n, 0)
        frame = bytes((7 * k + size) & 0xFF for k in range(size))
        qemu_sendv_packet_async(self.backend, [frame], None)
        self.run_bottom_halves()
        if was_broken or not clean:
            self.clean = False
            return
        assert not n.broken, f"a valid RX chain on a clean ring was refused: {n.broken_reason}"
        assert r.take_used(ndescs) == (buf_id, hdr + size)
        assert bytes(self.ram[buf + hdr : buf + hdr + size]) == frame
        stats["rx_frames"] += 1
