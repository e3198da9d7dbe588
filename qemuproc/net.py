"""Stands for net/net.c and net/queue.c: net clients, their peers, and the packet queue.

A NIC and a backend (slirp) are peers. Sending from one delivers into the other's
``incoming_queue``: delivered at once if the receiver can take it, else queued (bounded:
beyond ``nq_maxlen`` a packet with no completion callback is dropped and counted). A
receiver that returned 0 is disabled until ``qemu_flush_queued_packets``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from common.trace import traced

QEMU_NET_PACKET_FLAG_NONE = 0
NET_QUEUE_MAXLEN = 10000

SentCb = Callable[["NetClientState", int], None] | None


class NetFilter:
    """A netfilter on a client (net/filter.c): sees each packet, may pass it on."""

    def receive_iov(self, nc: NetClientState, sender: NetClientState,
                    iov: list[memoryview | bytes]) -> None:
        raise NotImplementedError


class NetClientInfo:
    """The callbacks a client type provides (struct NetClientInfo)."""

    def __init__(self, type_: str, receive: Callable[[NetClientState, Any], int],
                 can_receive: Callable[[NetClientState], bool] | None = None,
                 **vnet: Callable[..., Any]) -> None:
        self.type = type_
        self.receive = receive
        self.can_receive = can_receive
        # receive_iov and the vnet header / offload callbacks a tap has (has_vnet_hdr, ...)
        self.receive_iov: Callable[[NetClientState, list], int] | None = vnet.get("receive_iov")
        self.has_vnet_hdr = vnet.get("has_vnet_hdr")
        self.has_vnet_hdr_len = vnet.get("has_vnet_hdr_len")
        self.using_vnet_hdr = vnet.get("using_vnet_hdr")
        self.set_vnet_hdr_len = vnet.get("set_vnet_hdr_len")
        self.set_offload = vnet.get("set_offload")
        self.get_using_vnet_hdr = vnet.get("get_using_vnet_hdr")
        self.get_vnet_hdr_len = vnet.get("get_vnet_hdr_len")
        self.poll = vnet.get("poll")  # a backend vhost takes over stops being polled
        self.link_status_changed = vnet.get("link_status_changed")


class NetPacket:
    __slots__ = ("sender", "flags", "data", "sent_cb")

    def __init__(self, sender: NetClientState, flags: int, data: bytes, sent_cb: SentCb) -> None:
        self.sender = sender
        self.flags = flags
        self.data = data
        self.sent_cb = sent_cb


class NetQueue:
    def __init__(self, owner: NetClientState, maxlen: int = NET_QUEUE_MAXLEN) -> None:
        self.owner = owner
        self.nq_maxlen = maxlen
        self.packets: deque[NetPacket] = deque()
        self.delivering = False
        self.dropped = 0
        self.queued = 0
        self.flush_dropped = 0
        """Queued packets the receiver refused (-1) when flushed: virtio-net's flush at
        DRIVER_OK runs before the status is stored, so its can_receive still says no."""

    def qemu_net_queue_append(self, sender: NetClientState, flags: int, data: bytes,
                              sent_cb: SentCb) -> None:
        if len(self.packets) >= self.nq_maxlen and sent_cb is None:
            self.dropped += 1
            return
        self.queued += 1
        self.packets.append(NetPacket(sender, flags, data, sent_cb))


class NetClientState:
    def __init__(self, info: NetClientInfo, name: str, model: str, queue_index: int = 0) -> None:
        self.info = info
        self.name = name
        self.model = model
        self.queue_index = queue_index
        self.peer: NetClientState | None = None
        self.incoming_queue = NetQueue(self)
        self.receive_disabled = False
        self.link_down = False
        self.vring_enable = False  # a vhost-user pair's queues enabled (vhost_set_vring_enable)
        self.filters: list[NetFilter] = []
        self.opaque: Any = None
        self.sent = 0
        self.received = 0
        self.rx_from_queue = 0  # the sender's queue pair of the frame being received


def qemu_net_queue_purge(queue: NetQueue, sender: NetClientState) -> None:
    """Drop what ``sender`` queued on ``queue``; each dropped packet's sender hears it is
    done (sent_cb with 0), as if it had gone."""
    purged = [p for p in queue.packets if p.sender is sender]
    if not purged:
        return
    queue.packets = type(queue.packets)(p for p in queue.packets if p.sender is not sender)
    for p in purged:
        if p.sent_cb is not None:
            p.sent_cb(p.sender, 0)


def qemu_purge_queued_packets(nc: NetClientState) -> None:
    """Drop what ``nc`` sent that waits in its peer's incoming queue."""
    if nc.peer is not None:
        qemu_net_queue_purge(nc.peer.incoming_queue, nc)


def qemu_new_net_client(info: NetClientInfo, peer: NetClientState | None, model: str,
                        name: str) -> NetClientState:
    nc = NetClientState(info, name, model)
    if peer is not None:
        nc.peer = peer
        peer.peer = nc
    return nc


def qmp_set_link(ncs: list[NetClientState], up: bool) -> None:
    """set_link: the netdev's queues ``ncs`` up or down; a NIC peer follows and is told
    (link_status_changed)."""
    for nc in ncs:
        nc.link_down = not up
    nc = ncs[0]
    if nc.info.link_status_changed is not None:
        nc.info.link_status_changed(nc)
    if nc.peer is not None:
        if nc.peer.info.type == "nic":
            for q in ncs:
                if q.peer is not None:
                    q.peer.link_down = not up
        if nc.peer.info.link_status_changed is not None:
            nc.peer.info.link_status_changed(nc.peer)


def qemu_can_send_packet(sender: NetClientState) -> bool:
    peer = sender.peer
    if peer is None or peer.receive_disabled:
        return False
    if peer.info.can_receive is not None:
        return peer.info.can_receive(peer)
    return True


@traced
def nc_sendv_compat(nc: NetClientState, iov: list[memoryview | bytes], flags: int) -> int:
    """Hand a receive() that takes one buffer a linear copy of the iovec (none if one piece)."""
    if len(iov) == 1:
        buffer = iov[0]
    else:
        buffer = b"".join(iov)
    return nc.info.receive(nc, buffer)


def qemu_deliver_packet_iov(sender: NetClientState, flags: int, iov: list[memoryview | bytes],
                            nc: NetClientState) -> int:
    if nc.link_down:
        return sum(len(b) for b in iov)
    if nc.receive_disabled:
        return 0
    nc.rx_from_queue = sender.queue_index
    if nc.info.receive_iov is not None:
        ret = nc.info.receive_iov(nc, iov)
    else:
        ret = nc_sendv_compat(nc, iov, flags)
    if ret == 0:
        nc.receive_disabled = True
    else:
        nc.received += 1
    return ret


def qemu_net_queue_flush(queue: NetQueue) -> bool:
    """Deliver queued packets in order; False if the receiver stopped taking them."""
    nc = queue.owner
    while queue.packets:
        packet = queue.packets.popleft()
        queue.delivering = True
        ret = qemu_deliver_packet_iov(packet.sender, packet.flags, [packet.data], nc)
        queue.delivering = False
        if ret == 0:
            queue.packets.appendleft(packet)
            return False
        if ret < 0:
            queue.flush_dropped += 1
        if packet.sent_cb is not None:
            packet.sent_cb(packet.sender, ret)
    return True


@traced
def qemu_net_queue_send_iov(queue: NetQueue, sender: NetClientState, flags: int,
                            iov: list[memoryview | bytes], sent_cb: SentCb) -> int:
    if queue.delivering or not qemu_can_send_packet(sender):
        queue.qemu_net_queue_append(sender, flags, b"".join(iov), sent_cb)
        return 0
    queue.delivering = True
    ret = qemu_deliver_packet_iov(sender, flags, iov, queue.owner)
    queue.delivering = False
    if ret == 0:
        queue.qemu_net_queue_append(sender, flags, b"".join(iov), sent_cb)
        return 0
    qemu_net_queue_flush(queue)
    return ret


@traced
def qemu_sendv_packet_async(sender: NetClientState, iov: list[memoryview | bytes],
                            sent_cb: SentCb, peer: NetClientState | None = None) -> int:
    """Send a frame to the sender's peer (or to ``peer``, one queue of a multiqueue NIC);
    0 means queued, and ``sent_cb`` runs when it goes."""
    peer = peer or sender.peer
    sender.sent += 1
    if sender.link_down or peer is None:
        return sum(len(b) for b in iov)
    for f in sender.filters:
        f.receive_iov(sender, sender, iov)
    for f in peer.filters:
        f.receive_iov(peer, sender, iov)
    return qemu_net_queue_send_iov(peer.incoming_queue, sender, QEMU_NET_PACKET_FLAG_NONE, iov,
                                   sent_cb)


@traced
def qemu_send_packet(nc: NetClientState, buf: bytes, peer: NetClientState | None = None) -> int:
    return qemu_sendv_packet_async(nc, [buf], None, peer)


def qemu_flush_or_purge_queued_packets(nc: NetClientState, purge: bool) -> bool:
    """Deliver what waits in ``nc``'s incoming queue; with ``purge``, what it cannot take
    now is dropped (its senders hear 0). True if the queue emptied."""
    nc.receive_disabled = False
    if qemu_net_queue_flush(nc.incoming_queue):
        return True
    if purge and nc.peer is not None:
        qemu_net_queue_purge(nc.incoming_queue, nc.peer)
    return False


def qemu_flush_queued_packets(nc: NetClientState) -> bool:
    return qemu_flush_or_purge_queued_packets(nc, False)


# -- the vnet header and offloads of a peer (qemu_has_vnet_hdr, qemu_set_offload, ...) ----------


def qemu_has_vnet_hdr(nc: NetClientState | None) -> bool:
    return nc is not None and nc.info.has_vnet_hdr is not None and nc.info.has_vnet_hdr(nc)


def qemu_has_vnet_hdr_len(nc: NetClientState | None, length: int) -> bool:
    return nc is not None and nc.info.has_vnet_hdr_len is not None \
        and nc.info.has_vnet_hdr_len(nc, length)


def qemu_using_vnet_hdr(nc: NetClientState | None, enable: bool) -> None:
    if nc is not None and nc.info.using_vnet_hdr is not None:
        nc.info.using_vnet_hdr(nc, enable)


def qemu_set_vnet_hdr_len(nc: NetClientState | None, length: int) -> None:
    if nc is not None and nc.info.set_vnet_hdr_len is not None:
        nc.info.set_vnet_hdr_len(nc, length)


def qemu_set_offload(nc: NetClientState | None, csum: bool, tso4: bool, tso6: bool, ecn: bool,
                     ufo: bool) -> None:
    if nc is not None and nc.info.set_offload is not None:
        nc.info.set_offload(nc, csum, tso4, tso6, ecn, ufo)


def qemu_get_using_vnet_hdr(nc: NetClientState) -> bool:
    return nc.info.get_using_vnet_hdr is not None and nc.info.get_using_vnet_hdr(nc)


def qemu_get_vnet_hdr_len(nc: NetClientState) -> int:
    return nc.info.get_vnet_hdr_len(nc) if nc.info.get_vnet_hdr_len is not None else 0
