"""Stands for hw/net/virtio-net.c: the virtio-net device model.

TX: a kick runs ``virtio_net_handle_tx_bh`` (or ``_tx_timer``), which disables notifications
and defers to ``virtio_net_tx_bh``; that flushes up to ``tx_burst`` packets
(``virtio_net_flush_tx``: pop, strip the virtio-net header, ``qemu_sendv_packet_async``,
push, notify), then re-enables notifications and flushes once more to close the race.
A backend that cannot take a packet parks it in ``async_tx`` until ``virtio_net_tx_complete``.
RX: ``virtio_net_receive`` fills guest buffers (header + frame, several buffers with
VIRTIO_NET_F_MRG_RXBUF), pushes them and notifies; with no buffers the frame waits in the
net queue until the guest refills (``virtio_net_handle_rx``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from common.guest_memory import GuestMemory
from common.trace import trace_event, traced
from common.virtio_abi import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    VIRTIO_NET_CONFIG,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_ANNOUNCE_ACK,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_CTRL_HDR,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_CTRL_RX_NOMULTI,
    VIRTIO_NET_CTRL_RX_NOUNI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_CTRL_VLAN_ADD,
    VIRTIO_NET_CTRL_VLAN_DEL,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_MRG_RXBUF,
    VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    virtio_net_hdr_len,
)
from qemuproc.aio import QEMUBH, qemu_bh_cancel, qemu_bh_new, qemu_bh_schedule
from qemuproc.main_loop import MainLoop
from qemuproc.net import (
    NetClientInfo,
    NetClientState,
    qemu_flush_or_purge_queued_packets,
    qemu_flush_queued_packets,
    qemu_has_vnet_hdr,
    qemu_has_vnet_hdr_len,
    qemu_net_queue_purge,
    qemu_new_net_client,
    qemu_sendv_packet_async,
    qemu_set_offload,
    qemu_set_vnet_hdr_len,
    qemu_using_vnet_hdr,
)
from qemuproc.qemu_timer import (
    QEMU_CLOCK_VIRTUAL,
    QEMUTimer,
    qemu_clock_get_ns,
    timer_del,
    timer_mod,
)
from qemuproc.tap import tap_disable, tap_enable
from qemuproc.vhost_net import (
    get_vhost_net,
    vhost_net_ack_features,
    vhost_net_get_features,
    vhost_net_start,
    vhost_net_stop,
    vhost_set_vring_enable,
)
from qemuproc.virtio import (
    VirtIODevice,
    VirtQueue,
    VirtQueueElement,
    error_report,
    virtio_add_queue,
    virtio_error,
    virtio_notify,
    virtio_notify_config,
    virtio_queue_empty,
    virtio_queue_ready,
    virtio_queue_set_notification,
    virtqueue_avail_bytes,
    virtqueue_detach_element,
    virtqueue_drop_all,
    virtqueue_fill,
    virtqueue_flush,
    virtqueue_pop,
    virtqueue_push,
    virtqueue_unpop,
)

TX_BURST = 256
TX_TIMER_INTERVAL_NS = 150_000  # x-txtimer: 150 us
EBUSY = 16
EINVAL = 22
NET_BUFSIZE = 4096 + 65536
"""net/net.c: the largest packet a backend is handed; a guest chain may map far more."""

MAC_TABLE_ENTRIES = 64
MAX_VLAN = 1 << 12
ETH_ALEN = 6
RX_MODES = {VIRTIO_NET_CTRL_RX_PROMISC: "promisc", VIRTIO_NET_CTRL_RX_ALLMULTI: "allmulti",
            VIRTIO_NET_CTRL_RX_ALLUNI: "alluni", VIRTIO_NET_CTRL_RX_NOMULTI: "nomulti",
            VIRTIO_NET_CTRL_RX_NOUNI: "nouni", VIRTIO_NET_CTRL_RX_NOBCAST: "nobcast"}
"""VIRTIO_NET_CTRL_RX commands and the receive-filter flag each sets."""

trace_virtio_net_receive = trace_event("virtio_net_receive")


class MacTable:
    """n->mac_table: unicast addresses, then multicast ones from ``first_multi`` on."""

    __slots__ = ("macs", "first_multi", "uni_overflow", "multi_overflow")

    def __init__(self, macs: list[bytes] | None = None, first_multi: int = 0,
                 uni_overflow: bool = False, multi_overflow: bool = False) -> None:
        self.macs = macs or []
        self.first_multi = first_multi
        self.uni_overflow = uni_overflow
        self.multi_overflow = multi_overflow


class VirtIONetQueue:
    def __init__(self, n: VirtIONet, index: int) -> None:
        self.n = n
        self.index = index
        self.rx_vq: VirtQueue = None  # type: ignore[assignment]
        self.tx_vq: VirtQueue = None  # type: ignore[assignment]
        self.tx_bh: QEMUBH | None = None
        self.tx_timer: QEMUTimer | None = None
        self.tx_waiting = False
        self.async_tx: tuple[VirtQueue, VirtQueueElement] | None = None
        self.tx_packets = 0
        self.rx_packets = 0
        self.rx_no_buffer = 0
        self.async_tx_parks = 0


class VirtIONet(VirtIODevice):
    def __init__(self, dma: GuestMemory, main_loop: MainLoop, *, queue_size: int = 256,
                 mac: bytes = bytes.fromhex("525400123456"), tx: str = "bh",
                 tx_burst: int = TX_BURST, event_idx: bool = True, mrg_rxbuf: bool = False,
                 any_layout: bool = True, indirect_desc: bool = True, queues: int = 1,
                 packed: bool = False,
                 poll_us: float = 0.0, csum: bool = True) -> None:
        super().__init__("virtio-net", VIRTIO_ID_NET, VIRTIO_NET_CONFIG.size, dma)
        self.main_loop = main_loop
        self.conf_mac = self.mac = mac
        self.status_net = VIRTIO_NET_S_LINK_UP
        self.tx = tx
        self.tx_burst = tx_burst
        self.tx_timeout = TX_TIMER_INTERVAL_NS
        self.poll_ns = int(poll_us * 1000)
        self.tx_polls = self.tx_poll_hits = 0
        self.queue_size = queue_size
        self.mergeable_rx_bufs = False
        self.guest_hdr_len = virtio_net_hdr_len(False)
        self.host_hdr_len = 0  # slirp takes plain frames: no vnet header on the backend side
        self.has_vnet_hdr = False  # peer_has_vnet_hdr: only tap has one, -netdev user not
        self.csum = csum  # csum=on|off: offer the checksum offloads a vnet header carries
        self.vhost_started = False
        self.vhost_queue_pairs = 0
        self.vhost_bus: Any = None  # the transport (virtio-pci), for vhost_net_start
        self.max_queue_pairs = queues
        self.curr_queue_pairs = 1
        self.multiqueue = False
        self.vqs: list[VirtIONetQueue] = []
        self.ctrl_vq: VirtQueue | None = None
        self.ncs: list[NetClientState] = []
        self.nic: NetClientState = None  # type: ignore[assignment]
        self.on_ctrl_mq: Callable[[], None] = lambda: None
        """Runs after each control command, before its reply (cpr's record)."""
        self.ctrl_commands = 0
        self.virtio_net_reset_rx_filter()
        # QEMU's defaults for -device virtio-net-pci (mq=off unless queues > 1)
        features = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) \
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY) | (1 << VIRTIO_NET_F_CTRL_VQ) \
            | (1 << VIRTIO_NET_F_CTRL_RX) | (1 << VIRTIO_NET_F_CTRL_VLAN) \
            | (1 << VIRTIO_NET_F_CTRL_RX_EXTRA) | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE) \
            | (1 << VIRTIO_NET_F_CTRL_MAC_ADDR) | (1 << VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
        if any_layout:
            features |= 1 << VIRTIO_F_ANY_LAYOUT
        if event_idx:
            features |= 1 << VIRTIO_RING_F_EVENT_IDX
        if indirect_desc:
            features |= 1 << VIRTIO_RING_F_INDIRECT_DESC
        if packed:  # virtio-device's packed=on (DEFINE_PROP_BIT64 in host_features)
            features |= 1 << VIRTIO_F_RING_PACKED
        if mrg_rxbuf:
            features |= 1 << VIRTIO_NET_F_MRG_RXBUF
        if queues > 1:
            features |= 1 << VIRTIO_NET_F_MQ
        self.host_features = features

    def virtio_net_reset_rx_filter(self) -> None:
        """virtio_net_reset's filter part: promiscuous (compatibility mode), empty tables."""
        self.promisc = True
        self.allmulti = self.alluni = self.nomulti = self.nouni = self.nobcast = False
        self.mac_table = MacTable()
        self.mac = self.conf_mac
        self.vlans = [0] * (MAX_VLAN >> 5)
        self.status_net &= ~VIRTIO_NET_S_ANNOUNCE

    # -- VirtioDeviceClass hooks --------------------------------------------------------------

    def get_config(self) -> bytes:
        return VIRTIO_NET_CONFIG.pack(self.mac, self.status_net, self.max_queue_pairs)

    def set_features(self, features: int) -> None:
        """virtio_net_set_features: the header size, multiqueue, VLAN filter and offloads
        follow the features; each vhost back end is told which of its own were acked."""
        virtio_net_set_mrg_rx_bufs(self, bool(features & (1 << VIRTIO_NET_F_MRG_RXBUF)),
                                   bool(features & (1 << VIRTIO_F_VERSION_1)))
        self.multiqueue = bool(features & (1 << VIRTIO_NET_F_MQ))
        virtio_net_set_queue_pairs(self)  # virtio_net_set_multiqueue
        # without VLAN filtering offered to the driver, every VLAN passes
        fill = 0 if features & (1 << VIRTIO_NET_F_CTRL_VLAN) else 0xFFFFFFFF
        self.vlans = [fill] * (MAX_VLAN >> 5)
        if self.has_vnet_hdr:
            virtio_net_apply_guest_offloads(self, features)
        for nc in self.ncs:
            net = get_vhost_net(nc.peer)
            if net is not None:
                vhost_net_ack_features(net, features)

    def set_status(self, status: int) -> None:
        """virtio_net_set_status: vhost starts or stops; each queue pair QEMU itself serves
        (DRIVER_OK, link up, running, within the pairs in use, not vhost's) flushes what
        waited for it and resumes a waiting TX; for any other pair a waiting TX bottom half
        or timer is cancelled and, with the link down, what the guest queued is dropped
        (virtio_net_drop_tx_queue_data), so its kicks come again. It runs before
        virtio_set_status stores ``status``, so at DRIVER_OK virtio_net_can_receive still says
        no and each waiting frame is dropped (-1), as in QEMU; a pair the control queue turns
        on later gets its frames (virtio_net_handle_mq calls this again)."""
        virtio_net_vhost_status(self, status)
        for i, q in enumerate(self.vqs):
            if (not self.multiqueue and i != 0) or i >= self.curr_queue_pairs:
                queue_status = 0
            else:
                queue_status = status
            queue_started = virtio_net_started(self, queue_status) and not self.vhost_started
            if queue_started:
                qemu_flush_queued_packets(self.ncs[i])
            if not q.tx_waiting:
                continue
            if queue_started:
                if q.tx_timer is not None:
                    timer_mod(q.tx_timer, qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + self.tx_timeout)
                elif q.tx_bh is not None:
                    qemu_bh_schedule(q.tx_bh)
                continue
            if q.tx_timer is not None:
                timer_del(q.tx_timer)
            elif q.tx_bh is not None:
                qemu_bh_cancel(q.tx_bh)
            if not self.status_net & VIRTIO_NET_S_LINK_UP \
                    and queue_status & VIRTIO_CONFIG_S_DRIVER_OK and self.vm_running:
                q.tx_waiting = False  # the guest queued frames with notifications off
                virtio_queue_set_notification(q.tx_vq, True)
                virtio_net_drop_tx_queue_data(self, q.tx_vq)

    def reset(self) -> None:
        """virtio_net_reset: among the rest, a TX frame the backend still holds is flushed
        or purged, so that no element stays parked in ``async_tx``."""
        for i, nc in enumerate(self.ncs):
            if nc.peer is not None and i < len(self.vqs):
                qemu_flush_or_purge_queued_packets(nc.peer, True)
        for q in self.vqs:
            q.tx_waiting = False
            q.async_tx = None
            if q.tx_timer is not None:
                timer_del(q.tx_timer)
        virtio_net_set_mrg_rx_bufs(self, False)
        self.curr_queue_pairs = 1
        self.multiqueue = False
        self.virtio_net_reset_rx_filter()


def virtio_net_started(n: VirtIONet, status: int) -> bool:
    return bool(status & VIRTIO_CONFIG_S_DRIVER_OK) and bool(n.status_net & VIRTIO_NET_S_LINK_UP) \
        and n.vm_running


def virtio_net_drop_tx_queue_data(vdev: VirtIONet, vq: VirtQueue) -> None:
    if virtqueue_drop_all(vq):
        virtio_notify(vdev, vq)


def virtio_net_vhost_status(n: VirtIONet, status: int) -> None:
    """Start vhost-net when the driver is ready (and the link up), stop it otherwise; if it
    cannot start, QEMU's userspace virtio-net serves the queues."""
    nc = n.ncs[0]
    if get_vhost_net(nc.peer) is None:
        return
    started = bool(status & VIRTIO_CONFIG_S_DRIVER_OK) and n.vm_running \
        and not nc.peer.link_down  # type: ignore[union-attr]
    if started == n.vhost_started:
        return
    queue_pairs = n.max_queue_pairs if n.multiqueue else 1
    if not n.vhost_started:
        for i in range(queue_pairs):  # frames still queued either way would touch the rings
            qnc = n.ncs[i]
            if qnc.peer is not None:
                qemu_net_queue_purge(qnc.peer.incoming_queue, qnc)
                qemu_net_queue_purge(qnc.incoming_queue, qnc.peer)
        n.vhost_started = True
        n.vhost_queue_pairs = queue_pairs
        try:
            vhost_net_start(n, n.ncs, queue_pairs, n.vhost_bus)
        except OSError as e:
            error_report(f"unable to start vhost net: {e}: falling back on userspace virtio")
            n.vhost_started = False
    else:
        vhost_net_stop(n, n.ncs, n.vhost_queue_pairs, n.vhost_bus)
        n.vhost_started = False


def virtio_net_set_link_status(nc: NetClientState) -> None:
    """The peer's link went up or down (qmp_set_link): the config's LINK_UP bit follows, the
    guest is told, and vhost stops or starts with it."""
    n = nc.opaque
    old = n.status_net
    if nc.link_down:
        n.status_net &= ~VIRTIO_NET_S_LINK_UP
    else:
        n.status_net |= VIRTIO_NET_S_LINK_UP
    if n.status_net != old:
        virtio_notify_config(n)
    n.set_status(n.status)


def peer_attach(n: VirtIONet, index: int) -> int:
    """Queue pair ``index`` is in use: a vhost-user back end enables its rings, a multiqueue
    tap attaches its queue (tap_enable)."""
    nc = n.ncs[index]
    if nc.peer is not None and nc.peer.info.type == "vhost-user":
        vhost_set_vring_enable(nc.peer, True)
    if nc.peer is None or nc.peer.info.type != "tap" or n.max_queue_pairs == 1 \
            or nc.peer is n.ncs[0].peer and index:
        return 0
    return tap_enable(nc.peer)


def peer_detach(n: VirtIONet, index: int) -> int:
    nc = n.ncs[index]
    if nc.peer is not None and nc.peer.info.type == "vhost-user":
        vhost_set_vring_enable(nc.peer, False)
    if nc.peer is None or nc.peer.info.type != "tap" or n.max_queue_pairs == 1 \
            or nc.peer is n.ncs[0].peer and index:
        return 0
    return tap_disable(nc.peer)


def virtio_net_set_queue_pairs(n: VirtIONet) -> None:
    """The backend's queues follow the pairs the guest uses: attached below
    ``curr_queue_pairs``, detached above."""
    for i in range(len(n.ncs)):
        if i < n.curr_queue_pairs:
            peer_attach(n, i)
        else:
            peer_detach(n, i)


def peer_has_vnet_hdr(n: VirtIONet) -> bool:
    return qemu_has_vnet_hdr(n.ncs[0].peer if n.ncs else None)


def virtio_net_set_mrg_rx_bufs(n: VirtIONet, mergeable_rx_bufs: bool,
                               version_1: bool = False) -> None:
    """The guest's header length (virtio 1.0 always has num_buffers: 12 bytes); a backend
    that can take the same one gets it unchanged (host_hdr_len == guest_hdr_len), a backend
    without vnet headers none."""
    n.mergeable_rx_bufs = mergeable_rx_bufs
    n.guest_hdr_len = virtio_net_hdr_len(mergeable_rx_bufs or version_1)
    if n.has_vnet_hdr:
        for nc in n.ncs:
            if qemu_has_vnet_hdr_len(nc.peer, n.guest_hdr_len):
                qemu_set_vnet_hdr_len(nc.peer, n.guest_hdr_len)
                n.host_hdr_len = n.guest_hdr_len


def virtio_net_apply_guest_offloads(n: VirtIONet, features: int) -> None:
    """What the guest can take goes to the backend: VIRTIO_NET_F_GUEST_CSUM -> TUN_F_CSUM
    (the host may then hand it frames whose checksum is still partial)."""
    qemu_set_offload(n.ncs[0].peer, bool(features & (1 << VIRTIO_NET_F_GUEST_CSUM)),
                     False, False, False, False)


@traced
def virtio_net_device_init(n: VirtIONet,
                           netdev: NetClientState | list[NetClientState]) -> NetClientState:
    """Add each pair's rx/tx queues with their handlers and TX bottom half, the control
    queue, and the NIC's net clients (one per queue pair). A multiqueue backend (a tap with
    one net client per queue) peers each pair with its own queue; a single one (slirp) is
    every pair's peer."""
    peers = netdev if isinstance(netdev, list) else None
    netdev = peers[0] if peers else netdev  # type: ignore[assignment]
    info = NetClientInfo("nic", virtio_net_receive, virtio_net_can_receive,
                         link_status_changed=virtio_net_set_link_status)
    for i in range(n.max_queue_pairs):
        q = VirtIONetQueue(n, i)
        q.rx_vq = virtio_add_queue(n, n.queue_size, virtio_net_handle_rx, f"RX(q{2 * i})")
        name = f"TX(q{2 * i + 1})"
        if n.tx == "timer":
            q.tx_vq = virtio_add_queue(n, n.queue_size, virtio_net_handle_tx_timer, name)
            q.tx_timer = n.main_loop.timer_new(virtio_net_tx_timer, q, f"virtio_net_tx_timer{i}")
        else:
            q.tx_vq = virtio_add_queue(n, n.queue_size, virtio_net_handle_tx_bh, name)
            q.tx_bh = qemu_bh_new(virtio_net_tx_bh, q, f"virtio_net_tx_bh{i}")
        n.vqs.append(q)
        if peers is not None and len(peers) == n.max_queue_pairs:
            nc = qemu_new_net_client(info, peers[i], "virtio-net-pci", f"virtio-net-pci.{i}")
        else:
            nc = qemu_new_net_client(info, netdev if i == 0 else None, "virtio-net-pci",
                                     f"virtio-net-pci.{i}")
            if i:
                nc.peer = netdev  # every subqueue sends to the one slirp backend
        nc.queue_index = i
        nc.opaque = n
        n.ncs.append(nc)
    n.ctrl_vq = virtio_add_queue(n, 64, virtio_net_handle_ctrl,
                                 f"CTRL(q{2 * n.max_queue_pairs})")
    n.nic = n.ncs[0]
    if peer_has_vnet_hdr(n):  # virtio_net_get_features keeps the offloads; the tap takes ours
        n.has_vnet_hdr = True
        for nc in n.ncs:
            if nc.peer is not None:
                qemu_using_vnet_hdr(nc.peer, True)
        if n.csum:
            n.host_features |= (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_GUEST_CSUM)
        virtio_net_set_mrg_rx_bufs(n, False)
    vhost = get_vhost_net(netdev)
    if vhost is not None:  # what the kernel's vhost-net cannot do is not offered
        n.host_features = vhost_net_get_features(vhost, n.host_features)
    return n.nic


def qemu_get_subqueue(n: VirtIONet, queue_index: int) -> NetClientState:
    return n.ncs[queue_index]


def _queue_of(n: VirtIONet, vq: VirtQueue) -> VirtIONetQueue:
    return n.vqs[vq.queue_index // 2]


# -- the control queue ---------------------------------------------------------------------------


def virtio_net_handle_rx_mode(n: VirtIONet, cmd: int, iov: list[memoryview]) -> int:
    """VIRTIO_NET_CTRL_RX: one byte turns a receive-filter mode on or off."""
    on = iov_to_buf(iov, 1)
    if len(on) != 1:
        return VIRTIO_NET_ERR
    attr = RX_MODES.get(cmd)
    if attr is None:
        return VIRTIO_NET_ERR
    setattr(n, attr, bool(on[0]))
    return VIRTIO_NET_OK


def virtio_net_handle_mac(n: VirtIONet, cmd: int, iov: list[memoryview]) -> int:
    """VIRTIO_NET_CTRL_MAC: the MAC address, or the filter table (unicast entries then
    multicast entries, each list a le32 count and that many addresses; more than
    MAC_TABLE_ENTRIES in all turns that kind's overflow on instead)."""
    if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET:
        if iov_size(iov) != ETH_ALEN:
            return VIRTIO_NET_ERR
        n.mac = iov_to_buf(iov, ETH_ALEN)
        return VIRTIO_NET_OK
    if cmd != VIRTIO_NET_CTRL_MAC_TABLE_SET:
        return VIRTIO_NET_ERR
    macs: list[bytes] = []
    overflow = [False, False]
    for kind in (0, 1):  # unicast, multicast
        s = iov_to_buf(iov, 4)
        if len(s) != 4:
            return VIRTIO_NET_ERR
        entries = int.from_bytes(s, "little")
        iov = iov_discard_front(iov, 4)
        size = iov_size(iov)
        if (entries * ETH_ALEN > size) if kind == 0 else (entries * ETH_ALEN != size):
            return VIRTIO_NET_ERR
        if entries <= MAC_TABLE_ENTRIES - len(macs):
            table = iov_to_buf(iov, entries * ETH_ALEN)
            macs += [table[i : i + ETH_ALEN] for i in range(0, len(table), ETH_ALEN)]
        else:
            overflow[kind] = True
        if kind == 0:
            first_multi = len(macs)
            iov = iov_discard_front(iov, entries * ETH_ALEN)
    n.mac_table = MacTable(macs, first_multi, *overflow)
    return VIRTIO_NET_OK


def virtio_net_handle_vlan_table(n: VirtIONet, cmd: int, iov: list[memoryview]) -> int:
    vid_b = iov_to_buf(iov, 2)
    if len(vid_b) != 2:
        return VIRTIO_NET_ERR
    vid = int.from_bytes(vid_b, "little")
    if vid >= MAX_VLAN:
        return VIRTIO_NET_ERR
    if cmd == VIRTIO_NET_CTRL_VLAN_ADD:
        n.vlans[vid >> 5] |= 1 << (vid & 0x1F)
    elif cmd == VIRTIO_NET_CTRL_VLAN_DEL:
        n.vlans[vid >> 5] &= ~(1 << (vid & 0x1F))
    else:
        return VIRTIO_NET_ERR
    return VIRTIO_NET_OK


def virtio_net_handle_announce(n: VirtIONet, cmd: int, iov: list[memoryview]) -> int:
    """The driver acknowledges a VIRTIO_NET_S_ANNOUNCE (only a migration raises one)."""
    if cmd == VIRTIO_NET_CTRL_ANNOUNCE_ACK and n.status_net & VIRTIO_NET_S_ANNOUNCE:
        n.status_net &= ~VIRTIO_NET_S_ANNOUNCE
        return VIRTIO_NET_OK
    return VIRTIO_NET_ERR


def virtio_net_handle_mq(n: VirtIONet, cmd: int, iov: list[memoryview]) -> int:
    if cmd != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET or not n.guest_features & (1 << VIRTIO_NET_F_MQ):
        return VIRTIO_NET_ERR
    data = iov_to_buf(iov, 2)
    if len(data) != 2:
        return VIRTIO_NET_ERR
    queue_pairs = int.from_bytes(data, "little")
    if not (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= queue_pairs <= VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX) \
            or queue_pairs > n.max_queue_pairs or not n.multiqueue:
        return VIRTIO_NET_ERR
    n.curr_queue_pairs = queue_pairs
    virtio_net_set_queue_pairs(n)
    n.set_status(n.status)
    return VIRTIO_NET_OK


def virtio_net_handle_offloads(n: VirtIONet, cmd: int, iov: list[memoryview]) -> int:
    """GUEST_OFFLOADS_SET needs a backend with a vnet header; slirp has none."""
    return VIRTIO_NET_ERR


CTRL_HANDLERS: dict[int, Callable[[VirtIONet, int, list[memoryview]], int]] = {
    VIRTIO_NET_CTRL_RX: virtio_net_handle_rx_mode,
    VIRTIO_NET_CTRL_MAC: virtio_net_handle_mac,
    VIRTIO_NET_CTRL_VLAN: virtio_net_handle_vlan_table,
    VIRTIO_NET_CTRL_ANNOUNCE: virtio_net_handle_announce,
    VIRTIO_NET_CTRL_MQ: virtio_net_handle_mq,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS: virtio_net_handle_offloads,
}


def virtio_net_handle_ctrl_iov(n: VirtIONet, elem: VirtQueueElement) -> int:
    """One command: the class and command byte, then the class's data, from the readable
    buffers; the status byte into the first writable one. Returns the bytes written."""
    if iov_size(elem.in_sg) < 1 or iov_size(elem.out_sg) < VIRTIO_NET_CTRL_HDR.size:
        virtio_error(n, "virtio-net ctrl missing headers")
        return 0
    cls, cmd = VIRTIO_NET_CTRL_HDR.unpack(iov_to_buf(elem.out_sg, VIRTIO_NET_CTRL_HDR.size))
    handler = CTRL_HANDLERS.get(cls)
    status = VIRTIO_NET_ERR if handler is None else \
        handler(n, cmd, iov_discard_front(elem.out_sg, VIRTIO_NET_CTRL_HDR.size))
    n.ctrl_commands += 1
    n.on_ctrl_mq()
    iov_from_buf(elem.in_sg, 0, memoryview(bytes([status])))
    return 1


@traced
def virtio_net_handle_ctrl(vdev: VirtIONet, vq: VirtQueue) -> None:
    """Control commands from the driver (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, ...)."""
    while True:
        elem = virtqueue_pop(vq)
        if elem is None:
            break
        written = virtio_net_handle_ctrl_iov(vdev, elem)
        if written > 0:
            virtqueue_push(vq, elem, written)
            virtio_notify(vdev, vq)
        else:
            virtqueue_detach_element(vq, elem, 0)
            break


# -- TX ------------------------------------------------------------------------------------------


@traced
def virtio_net_handle_tx_bh(vdev: VirtIONet, vq: VirtQueue) -> None:
    q = _queue_of(vdev, vq)
    if not vdev.vm_running:
        q.tx_waiting = True
        return
    if q.tx_waiting:
        return
    q.tx_waiting = True
    virtio_queue_set_notification(vq, False)
    qemu_bh_schedule(q.tx_bh)  # type: ignore[arg-type]


@traced
def virtio_net_tx_bh(q: VirtIONetQueue) -> None:
    n = q.n
    q.tx_waiting = False
    if not n.status & VIRTIO_CONFIG_S_DRIVER_OK:
        return
    ret = virtio_net_flush_tx(q)
    if ret in (-EBUSY, -EINVAL):
        return  # re-enabled by virtio_net_tx_complete, or the device is broken
    # a full burst: assume more is coming; or the guest added more while we polled: go again
    if ret >= n.tx_burst or (n.poll_ns and virtio_net_tx_poll(q, n.poll_ns)):
        qemu_bh_schedule(q.tx_bh)  # type: ignore[arg-type]
        q.tx_waiting = True
        return
    # less than a burst: re-enable notifications, then look once more for what slipped in
    virtio_queue_set_notification(q.tx_vq, True)
    ret = virtio_net_flush_tx(q)
    if ret == -EINVAL:
        return
    if ret > 0:
        virtio_queue_set_notification(q.tx_vq, False)
        qemu_bh_schedule(q.tx_bh)  # type: ignore[arg-type]
        q.tx_waiting = True


def virtio_net_tx_poll(q: VirtIONetQueue, poll_ns: int) -> bool:
    """vhost-net's busy poll (vhost_net_busy_poll, ``-netdev ...,poll-us=N``): before
    notifications go back on, watch the avail index for up to ``poll_ns`` with them still
    off; True if the guest added buffers meanwhile (no kick needed for them)."""
    vq = q.tx_vq
    q.n.tx_polls += 1
    end = time.monotonic_ns() + poll_ns
    while time.monotonic_ns() < end:
        if not virtio_queue_empty(vq):
            q.n.tx_poll_hits += 1
            return True
    return False


@traced
def virtio_net_handle_tx_timer(vdev: VirtIONet, vq: VirtQueue) -> None:
    q = _queue_of(vdev, vq)
    if not vdev.vm_running:
        q.tx_waiting = True
        return
    if q.tx_waiting:  # packets already queued: flush now
        timer_del(q.tx_timer)  # type: ignore[arg-type]
        virtio_net_tx_timer(q)
    else:  # re-arm: flush this (and more) on the next tick
        timer_mod(q.tx_timer, qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + vdev.tx_timeout)  # type: ignore[arg-type]
        q.tx_waiting = True
        virtio_queue_set_notification(vq, False)


@traced
def virtio_net_tx_timer(q: VirtIONetQueue) -> None:
    n = q.n
    q.tx_waiting = False
    if not n.status & VIRTIO_CONFIG_S_DRIVER_OK:
        return
    ret = virtio_net_flush_tx(q)
    if ret in (-EBUSY, -EINVAL):
        return
    if ret >= n.tx_burst:
        q.tx_waiting = True
        timer_mod(q.tx_timer, qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + n.tx_timeout)  # type: ignore[arg-type]
        return
    virtio_queue_set_notification(q.tx_vq, True)
    ret = virtio_net_flush_tx(q)
    if ret > 0:
        virtio_queue_set_notification(q.tx_vq, False)
        q.tx_waiting = True
        timer_mod(q.tx_timer, qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL) + n.tx_timeout)  # type: ignore[arg-type]


def iov_discard_front(sg: list[memoryview], nbytes: int) -> list[memoryview]:
    out = []
    for m in sg:
        if nbytes >= len(m):
            nbytes -= len(m)
            continue
        out.append(m[nbytes:] if nbytes else m)
        nbytes = 0
    return out


@traced
def virtio_net_flush_tx(q: VirtIONetQueue) -> int:
    """Send what the guest queued, up to tx_burst; -EBUSY if the backend is full."""
    n = q.n
    vq = q.tx_vq
    num_packets = 0
    if not n.status & VIRTIO_CONFIG_S_DRIVER_OK:
        return num_packets
    if q.async_tx is not None:
        virtio_queue_set_notification(vq, False)
        return num_packets
    hdr_len = n.guest_hdr_len
    nic = n.ncs[q.index]
    burst = n.tx_burst
    while True:
        elem = virtqueue_pop(vq)
        if elem is None:
            break
        out_sg = elem.out_sg
        if not out_sg:
            virtio_error(n, "virtio-net header not in first element")
            virtqueue_detach_element(vq, elem, 0)
            return -EINVAL
        if elem.in_sg:  # vhost-net's check: QEMU would silently ignore them
            virtio_error(n, f"Unexpected descriptor format for TX: out {len(out_sg)}, "
                            f"int {len(elem.in_sg)}")
            virtqueue_detach_element(vq, elem, 0)
            return -EINVAL
        size = len(out_sg[0]) if len(out_sg) == 1 else sum(len(m) for m in out_sg)
        if n.has_vnet_hdr and size < hdr_len:  # the header is read only for such a backend
            virtio_error(n, "virtio-net header incorrect")
            virtqueue_detach_element(vq, elem, 0)
            return -EINVAL
        if n.host_hdr_len == hdr_len:  # the backend wants the guest's header as is
            sg = out_sg
        else:  # what follows the guest's header (nothing, from a chain no longer than the
            # header: QEMU 7.2 sends it all the same)
            sg = [out_sg[0][hdr_len:]] if len(out_sg) == 1 else iov_discard_front(out_sg,
                                                                                 hdr_len)
        if size - hdr_len > NET_BUFSIZE:  # nc_sendv_compat would refuse it: dropped, completed
            ret = -1
        else:
            ret = qemu_sendv_packet_async(nic, sg, virtio_net_tx_complete)
        if ret == 0:
            virtio_queue_set_notification(vq, False)
            q.async_tx = (vq, elem)
            q.async_tx_parks += 1
            return -EBUSY
        virtqueue_push(vq, elem, 0)
        virtio_notify(n, vq)
        q.tx_packets += 1
        num_packets += 1
        if num_packets >= burst:
            break
    return num_packets


@traced
def virtio_net_tx_complete(nc: NetClientState, length: int) -> None:
    """The backend took the parked packet: complete it and resume transmitting."""
    n: VirtIONet = nc.opaque
    q = n.vqs[nc.queue_index]
    if q.async_tx is None:
        return
    vq, elem = q.async_tx
    virtqueue_push(vq, elem, 0)
    virtio_notify(n, vq)
    q.tx_packets += 1
    q.async_tx = None
    virtio_queue_set_notification(vq, True)
    ret = virtio_net_flush_tx(q)
    if ret >= n.tx_burst:
        q.tx_waiting = True
        virtio_queue_set_notification(vq, False)
        if q.tx_bh is not None:
            qemu_bh_schedule(q.tx_bh)


# -- RX ------------------------------------------------------------------------------------------


@traced
def virtio_net_handle_rx(vdev: VirtIONet, vq: VirtQueue) -> None:
    """The guest posted RX buffers: deliver what was waiting for them."""
    qemu_flush_queued_packets(qemu_get_subqueue(vdev, vq.queue_index // 2))


def virtio_net_can_receive(nc: NetClientState) -> bool:
    n: VirtIONet = nc.opaque
    if nc.queue_index >= n.curr_queue_pairs:
        return False
    q = n.vqs[nc.queue_index]
    return bool(n.vm_running and n.status & VIRTIO_CONFIG_S_DRIVER_OK
                and virtio_queue_ready(q.rx_vq) and not n.broken)


def virtio_net_has_buffers(q: VirtIONetQueue, bufsize: int) -> bool:
    n = q.n
    vq = q.rx_vq
    if virtio_queue_empty(vq) or (n.mergeable_rx_bufs
                                  and not virtqueue_avail_bytes(vq, bufsize, 0)):
        virtio_queue_set_notification(vq, True)
        # the guest may have added buffers after the check above, before notifications were on
        if virtio_queue_empty(vq) or (n.mergeable_rx_bufs
                                      and not virtqueue_avail_bytes(vq, bufsize, 0)):
            return False
    virtio_queue_set_notification(vq, False)
    return True


def iov_size(sg: list[memoryview]) -> int:
    return sum(len(m) for m in sg)


def iov_to_buf(sg: list[memoryview], limit: int) -> bytes:
    """The first ``limit`` bytes of the scatter list (less if it is shorter)."""
    out = bytearray()
    for m in sg:
        if len(out) >= limit:
            break
        out += m[: limit - len(out)]
    return bytes(out)


def iov_from_buf(sg: list[memoryview], offset: int, buf: memoryview) -> int:
    """Copy ``buf`` into the scatter list starting ``offset`` bytes in; returns bytes copied."""
    done = 0
    for m in sg:
        if offset >= len(m):
            offset -= len(m)
            continue
        room = len(m) - offset
        chunk = min(room, len(buf) - done)
        m[offset : offset + chunk] = buf[done : done + chunk]
        done += chunk
        offset = 0
        if done == len(buf):
            break
    return done


def receive_filter(n: VirtIONet, buf: memoryview | bytes) -> bool:
    """Does the driver's receive filter (VIRTIO_NET_CTRL_RX/MAC/VLAN) let this frame in?"""
    if n.promisc:
        return True
    h = n.host_hdr_len
    if h:
        buf = buf[h:]
    if buf[12:14] == b"\x81\x00":
        vid = ((buf[14] << 8) | buf[15]) & 0xFFF
        if not n.vlans[vid >> 5] & (1 << (vid & 0x1F)):
            return False
    dst = bytes(buf[:ETH_ALEN])
    t = n.mac_table
    if buf[0] & 1:  # multicast
        if dst == b"\xff" * ETH_ALEN:
            return not n.nobcast
        if n.nomulti:
            return False
        if n.allmulti or t.multi_overflow:
            return True
        return dst in t.macs[t.first_multi :]
    if n.nouni:
        return False
    if n.alluni or t.uni_overflow or dst == n.mac:
        return True
    return dst in t.macs[: t.first_multi]


@traced
def virtio_net_receive(nc: NetClientState, buf: memoryview | bytes) -> int:
    """A frame for the guest: header + frame into RX buffers, then push and notify.

    Returns the size taken, 0 if the guest has no buffers (the frame waits in the net
    queue), or -1 if the device cannot receive at all.
    """
    n: VirtIONet = nc.opaque
    q = n.vqs[nc.queue_index]
    vq = q.rx_vq
    if not virtio_net_can_receive(nc):
        return -1
    size = len(buf)
    host_hdr_len = n.host_hdr_len
    if size <= host_hdr_len:  # nothing to put in a buffer: dropped (0 would mean "retry later")
        return -1
    hdr_len = n.guest_hdr_len
    if not virtio_net_has_buffers(q, size + hdr_len - host_hdr_len):
        q.rx_no_buffer += 1
        return 0
    if not receive_filter(n, buf):
        return size
    mv = memoryview(buf)
    if trace_virtio_net_receive.on:
        f = mv[host_hdr_len:]
        trace_virtio_net_receive(len=len(f), seq=int.from_bytes(f[42:50], "big")
                                 if len(f) >= 50 and f[12:14] == b"\x08\x00" and f[23] == 17
                                 else -1)
    elems: list[tuple[VirtQueueElement, int]] = []
    offset = 0
    while offset < size:
        elem = virtqueue_pop(vq)
        if elem is None:
            if elems:
                virtio_error(n, f"virtio-net unexpected empty queue: i {len(elems)} mergeable "
                                f"{int(n.mergeable_rx_bufs)} offset {offset}, size {size}, "
                                f"guest hdr len {hdr_len}")
            for e, _ in elems:
                virtqueue_detach_element(vq, e, 0)
            return -1
        if not elem.in_sg:
            virtio_error(n, "virtio-net receive queue contains no in buffers")
            virtqueue_detach_element(vq, elem, 0)
            return -1
        if not elems:
            # receive_header: the backend's header (its checksum flags) or, without one, zeros
            hdr = mv[: VIRTIO_NET_HDR.size] if host_hdr_len else memoryview(bytes(hdr_len))
            if iov_from_buf(elem.in_sg, 0, hdr) < len(hdr) or \
                    sum(len(m) for m in elem.in_sg) < hdr_len:
                virtio_error(n, "virtio-net header incorrect")
                virtqueue_detach_element(vq, elem, 0)
                return -1
            guest_offset = hdr_len
            total = hdr_len
            offset = host_hdr_len
        else:
            guest_offset = 0
            total = 0
        copied = iov_from_buf(elem.in_sg, guest_offset, mv[offset:])
        total += copied
        offset += copied
        if not n.mergeable_rx_bufs and offset < size:
            virtqueue_unpop(vq, elem, total)  # too small and cannot merge: drop the frame
            for e, _ in elems:
                virtqueue_detach_element(vq, e, 0)
            return size
        elems.append((elem, total))
    if n.mergeable_rx_bufs:
        first = elems[0][0]
        nb = len(elems).to_bytes(2, "little")
        iov_from_buf(first.in_sg, VIRTIO_NET_HDR_MRG_RXBUF.size - 2, memoryview(nb))
    for j, (elem, total) in enumerate(elems):
        virtqueue_fill(vq, elem, total, j)
    virtqueue_flush(vq, len(elems))
    virtio_notify(n, vq)
    q.rx_packets += 1
    return size


def rx_filter_state(n: VirtIONet) -> dict[str, Any]:
    """The receive filter as virtio-net's vmstate carries it (cpr's record)."""
    t = n.mac_table
    return {"mac": n.mac.hex(), **{attr: getattr(n, attr) for attr in RX_MODES.values()},
            "mac_table": [m.hex() for m in t.macs], "first_multi": t.first_multi,
            "uni_overflow": t.uni_overflow, "multi_overflow": t.multi_overflow,
            "vlans": n.vlans}


def rx_filter_load(n: VirtIONet, d: dict[str, Any]) -> None:
    n.mac = bytes.fromhex(d["mac"])
    for attr in RX_MODES.values():
        setattr(n, attr, d[attr])
    n.mac_table = MacTable([bytes.fromhex(m) for m in d["mac_table"]], d["first_multi"],
                           d["uni_overflow"], d["multi_overflow"])
    n.vlans = list(d["vlans"])


def describe(n: VirtIONet) -> dict[str, Any]:
    pairs = [{"tx_packets": q.tx_packets, "rx_packets": q.rx_packets,
              "rx_no_buffer": q.rx_no_buffer, "async_tx_parks": q.async_tx_parks,
              "tx_waiting": q.tx_waiting} for q in n.vqs]
    return {"tx_packets": sum(p["tx_packets"] for p in pairs),
            "rx_packets": sum(p["rx_packets"] for p in pairs),
            "rx_no_buffer": sum(p["rx_no_buffer"] for p in pairs),
            "async_tx_parks": sum(p["async_tx_parks"] for p in pairs),
            "queue_pairs": pairs, "max_queue_pairs": n.max_queue_pairs,
            "curr_queue_pairs": n.curr_queue_pairs,
            "mergeable_rx_bufs": n.mergeable_rx_bufs,
            "guest_hdr_len": n.guest_hdr_len, "tx": n.tx, "tx_burst": n.tx_burst,
            "poll_us": n.poll_ns / 1000, "tx_polls": n.tx_polls, "tx_poll_hits": n.tx_poll_hits,
            "ctrl_commands": n.ctrl_commands, "rx_filter": rx_filter_state(n)}
