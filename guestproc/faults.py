"""A hostile (or buggy) guest driver on demand: ``--guest-fault KIND``.

After ``FAULT_AFTER`` good frames the driver commits one fault on the TX queue: it writes raw
descriptors, avail entries, the avail index or a queue register exactly as a broken driver
would, through the guest's own view of its RAM, and kicks. Each kind breaks one rule the
device checks (qemuproc/virtio.py, virtio_net.py); the device answers with virtio_error,
sets NEEDS_RESET and raises the config interrupt, and the driver resets it
(``virtnet_reset``). The frame that carried the fault is lost; every other one arrives.

The descriptors a fault uses are taken from the driver's free list and the skb is recorded
as the chain's data, so the reset's ``free_unused_bufs`` returns it to the pool like any
in-flight buffer: the driver's private bookkeeping stays right, only the ring lies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.virtio_abi import (
    VIRTIO_PCI_QUEUE_ADDR_SHIFT,
    VIRTIO_PCI_QUEUE_PFN,
    VIRTIO_PCI_QUEUE_SEL,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from common.vring import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
)
from guestproc.mm import SkBuff
from guestproc.netstack import NETDEV_TX_OK, NetDevice, netif_device_detach
from guestproc.virtio_net import free_old_xmit_skbs
from guestproc.virtio_pci_modern_dev import vp_modern_queue_address, vp_modern_set_queue_enable
from guestproc.virtio_ring import INDIRECT_STRIDE, Virtqueue, virtqueue_notify

FAULT_AFTER = 5
DRAIN_TIMEOUT_S = 2.0


class Ring:
    """Raw access to one TX ring, as the driver that owns it sees it."""

    def __init__(self, vq: Virtqueue, skb: SkBuff, hdr_len: int, ram: memoryview) -> None:
        self.vq = vq
        self.ram = ram
        self.num = vq.num
        self.skb = skb
        self.hdr_len = hdr_len
        self.ram_size = len(ram)
        self.start = skb.data - hdr_len  # the virtio-net header sits in the headroom
        self.total = skb.len + hdr_len

    def take(self, n: int) -> list[int]:
        """``n`` descriptors off the driver's free list, privately chained as one buffer."""
        vq = self.vq
        out = []
        i = vq.free_head
        for k in range(n):
            out.append(i)
            vq.desc_extra_flags[i] = VRING_DESC_F_NEXT if k < n - 1 else 0
            i = vq.desc_extra_next[i]
        vq.free_head = i
        vq.num_free -= n
        vq.desc_state[out[0]] = self.skb
        return out

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.vq.desc, i << 4, addr & (2**64 - 1), length, flags, nxt)

    def table(self, head: int) -> int:
        """Room for an indirect table: the head's own, else the skb's headroom (4 entries)."""
        vq = self.vq
        return vq.indir_base + head * INDIRECT_STRIDE if vq.indir_base else self.skb.head

    def publish(self, head: int, avail_head: int | None = None, extra_idx: int = 0) -> None:
        """Put ``avail_head`` (default ``head``) in the next avail slot, move the index."""
        vq = self.vq
        shadow = vq.avail_idx_shadow
        vq.avail[2 + (shadow & (self.num - 1))] = head if avail_head is None else avail_head
        shadow = (shadow + 1) & 0xFFFF
        vq.avail_idx_shadow = shadow
        vq.avail[1] = (shadow + extra_idx) & 0xFFFF


def _good(r: Ring) -> int:
    [d] = r.take(1)
    r.desc(d, r.start, r.total)
    return d


def fault_avail_idx(r: Ring, vdev: Any) -> None:
    r.publish(_good(r), extra_idx=r.num)


def fault_head(r: Ring, vdev: Any) -> None:
    r.publish(_good(r), avail_head=r.num + 3)


def fault_next(r: Ring, vdev: Any) -> None:
    [d] = r.take(1)
    r.desc(d, r.start, r.total, VRING_DESC_F_NEXT, r.num + 1)
    r.publish(d)


def fault_loop(r: Ring, vdev: Any) -> None:
    a, b = r.take(2)
    r.desc(a, r.start, r.hdr_len, VRING_DESC_F_NEXT, b)
    r.desc(b, r.skb.data, r.skb.len, VRING_DESC_F_NEXT, a)
    r.publish(a)


def _indirect(r: Ring, length: int, entries: list[tuple[int, int, int, int]],
              addr: int | None = None) -> None:
    [d] = r.take(1)
    table = r.table(d)
    for k, (a, n, f, nxt) in enumerate(entries):
        DESC.pack_into(r.ram, table + k * VRING_DESC_SIZE, a, n, f, nxt)
    r.desc(d, table if addr is None else addr, length, VRING_DESC_F_INDIRECT)
    r.publish(d)


def fault_indirect_size(r: Ring, vdev: Any) -> None:
    _indirect(r, VRING_DESC_SIZE + 8, [(r.start, r.total, 0, 0)])


def fault_indirect_nested(r: Ring, vdev: Any) -> None:
    _indirect(r, 2 * VRING_DESC_SIZE, [(r.start, r.total, VRING_DESC_F_INDIRECT, 1),
                                       (r.start, r.total, 0, 0)])


def fault_indirect_too_big(r: Ring, vdev: Any) -> None:
    _indirect(r, (r.num + 1) * VRING_DESC_SIZE, [(r.start, r.total, 0, 0)])


def fault_indirect_oob(r: Ring, vdev: Any) -> None:
    _indirect(r, 2 * VRING_DESC_SIZE, [], addr=r.ram_size - VRING_DESC_SIZE)


def fault_order(r: Ring, vdev: Any) -> None:
    a, b = r.take(2)
    r.desc(a, r.start, r.hdr_len, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, b)
    r.desc(b, r.skb.data, r.skb.len)
    r.publish(a)


def fault_zero_len(r: Ring, vdev: Any) -> None:
    [d] = r.take(1)
    r.desc(d, r.start, 0)
    r.publish(d)


def fault_tx_writable(r: Ring, vdev: Any) -> None:
    a, b = r.take(2)
    r.desc(a, r.start, r.total, VRING_DESC_F_NEXT, b)
    r.desc(b, r.skb.head, 16, VRING_DESC_F_WRITE)
    r.publish(a)


def fault_oob_addr(r: Ring, vdev: Any) -> None:
    [d] = r.take(1)
    r.desc(d, r.ram_size - 8, 64)
    r.publish(d)


def fault_oob_overflow(r: Ring, vdev: Any) -> None:
    [d] = r.take(1)
    r.desc(d, 2**64 - 8, 64)  # addr + len wraps past 2**64 to a small address
    r.publish(d)


def fault_queue_pfn(r: Ring, vdev: Any) -> None:
    """Move the TX ring, while the device runs, to a page frame beyond guest RAM."""
    io = vdev.ioaddr
    vdev.cpu.outw(r.vq.index, io + VIRTIO_PCI_QUEUE_SEL)
    vdev.cpu.outl((r.ram_size >> VIRTIO_PCI_QUEUE_ADDR_SHIFT) + 16, io + VIRTIO_PCI_QUEUE_PFN)


def fault_queue_addr(r: Ring, vdev: Any) -> None:
    """virtio 1.0: give the TX queue a descriptor table beyond guest RAM and enable it
    again, while the device runs."""
    mdev = vdev.mdev
    vp_modern_queue_address(mdev, r.vq.index, r.ram_size + 0x10000, r.vq.layout.avail,
                            r.vq.layout.used)
    vp_modern_set_queue_enable(mdev, r.vq.index, True)


def fault_queue_enable(r: Ring, vdev: Any) -> None:
    """virtio 1.0: write queue_enable with a value other than 1 (a driver may not disable
    a queue that way)."""
    vp_modern_set_queue_enable(vdev.mdev, r.vq.index, False)


@dataclass(frozen=True)
class Fault:
    commit: Callable[[Ring, Any], None]
    expect: str
    """What the device says (its message starts so), with the run's default options."""
    help: str
    kick: bool = True
    transport: str | None = None
    """The transport the fault's registers belong to (None: any)."""


FAULTS: dict[str, Fault] = {
    "avail-idx": Fault(fault_avail_idx, "Guest moved used index from",
                       "move the avail index more than the queue size past the device"),
    "head": Fault(fault_head, "Guest says index",
                  "publish a head number >= the queue size in the avail ring"),
    "next": Fault(fault_next, "Desc next is", "chain to a descriptor >= the queue size"),
    "loop": Fault(fault_loop, "Looped descriptor",
                  "chain two descriptors to each other in a circle"),
    "indirect-size": Fault(fault_indirect_size, "Invalid size for indirect buffer table",
                           "an indirect table whose length is not a multiple of 16"),
    "indirect-nested": Fault(fault_indirect_nested, "Nested indirect descriptor",
                             "an indirect table entry that is itself indirect"),
    "indirect-too-big": Fault(fault_indirect_too_big, "Indirect buffer length too big",
                              "an indirect table with more entries than the queue size"),
    "indirect-oob": Fault(fault_indirect_oob, "Cannot map indirect buffer",
                          "an indirect table that runs past the end of guest RAM"),
    "order": Fault(fault_order, "Incorrect order for descriptors",
                   "a readable descriptor after a writable one"),
    "zero-len": Fault(fault_zero_len, "virtio: zero sized buffers are not allowed",
                      "a descriptor of length 0"),
    "tx-writable": Fault(fault_tx_writable, "Unexpected descriptor format for TX",
                         "a TX chain with a device-writable descriptor"),
    "oob-addr": Fault(fault_oob_addr, "virtio: bogus descriptor or out of resources",
                      "a buffer that runs past the end of guest RAM"),
    "oob-overflow": Fault(fault_oob_overflow, "virtio: bogus descriptor or out of resources",
                          "a buffer whose addr + len overflows 64 bits"),
    "queue-pfn": Fault(fault_queue_pfn, "Cannot map desc",
                       "write a TX queue PFN beyond guest RAM while the device runs",
                       kick=False, transport="legacy"),
    "queue-addr": Fault(fault_queue_addr, "Cannot map desc",
                        "modern: enable the TX queue again with its descriptor table beyond "
                        "guest RAM", kick=False, transport="modern"),
    "queue-enable": Fault(fault_queue_enable, "wrong value for queue_enable 0",
                          "modern: write 0 to the TX queue's queue_enable", kick=False,
                          transport="modern"),
}


def fault_kinds() -> list[tuple[str, str]]:
    return [(name, f.help) for name, f in FAULTS.items()]


class FaultInjector:
    """Wraps ndo_start_xmit: frames go through untouched until the fault's turn."""

    def __init__(self, vi: Any, kind: str, after: int = FAULT_AFTER) -> None:
        self.vi = vi
        self.kind = kind
        self.fault = FAULTS[kind]
        self.after = after
        self.seen = 0
        self.committed_at = 0
        self.start_xmit = vi.dev.ndo_start_xmit
        vi.dev.ndo_start_xmit = self.ndo_start_xmit

    def ndo_start_xmit(self, skb: SkBuff, dev: NetDevice) -> int:
        self.seen += 1
        if self.seen <= self.after:
            return self.start_xmit(skb, dev)
        dev.ndo_start_xmit = self.start_xmit  # one fault a run
        self.commit(skb, dev)
        return NETDEV_TX_OK

    def drain(self) -> bool:
        """Until the device has used every frame queued so far (each arrives), or timeout."""
        vi = self.vi
        kernel = vi.kernel
        deadline = kernel.now_ns() + int(DRAIN_TIMEOUT_S * 1e9)
        while True:
            for sq in vi.sq:
                free_old_xmit_skbs(sq, False)
            if all(sq.vq.num_free == sq.vq.num for sq in vi.sq):
                return True
            if kernel.now_ns() >= deadline:
                return False
            kernel.msleep(0.2)

    def commit(self, skb: SkBuff, dev: NetDevice) -> None:
        vi = self.vi
        self.drain()
        # nothing may follow the fault into the ring: the stack waits for the reset
        netif_device_detach(dev)
        sq = vi.sq[skb.queue_mapping]
        ring = Ring(sq.vq, skb, vi.hdr_len, vi.ram)
        self.committed_at = self.seen
        if self.fault.kick:
            self.fault.commit(ring, vi.vdev)
            virtqueue_notify(sq.vq)
        else:
            vi.skb_pool.kfree_skb(skb)
            self.fault.commit(ring, vi.vdev)

    def expect(self) -> str:
        if self.kind.startswith("indirect") \
                and not self.vi.vdev.features & (1 << VIRTIO_RING_F_INDIRECT_DESC):
            return "Indirect descriptors not negotiated"
        return self.fault.expect

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "after": self.after, "committed": bool(self.committed_at),
                "at_frame": self.committed_at, "expect": self.expect()}
