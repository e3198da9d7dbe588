"""Stands for drivers/net/virtio_net.c: the guest's virtio-net driver (Linux 6.1 shape).

Probe and queues: ``virtnet_probe`` -> ``init_vqs`` -> ``virtnet_alloc_queues`` ->
``virtnet_find_vqs`` (callbacks ``skb_recv_done`` / ``skb_xmit_done``, names input.N /
output.N) -> ``vdev.config.find_vqs``.
TX: ``start_xmit`` -> ``xmit_skb`` -> ``virtqueue_add_outbuf``; ``virtqueue_kick_prepare`` ->
``virtqueue_notify``; completions come back through ``skb_xmit_done`` -> NAPI
``virtnet_poll_tx`` -> ``free_old_xmit_skbs``.
RX: ``try_fill_recv`` posts buffers; ``skb_recv_done`` -> NAPI ``virtnet_poll`` ->
``virtnet_receive`` -> ``receive_buf`` -> the stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.inet import ETH_DATA_LEN, ETH_HLEN
from common.trace import trace_event, traced
from common.virtio_abi import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_CONFIG,
    VIRTIO_NET_CTRL_HDR,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_MRG_RXBUF,
    VIRTIO_NET_OK,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    virtio_net_hdr_len,
)
from guestproc.dev_addr_lists import (
    IFF_ALLMULTI,
    IFF_PROMISC,
    netdev_mc_count,
    netdev_uc_count,
)
from guestproc.kernel import (
    Kernel,
    Napi,
    __napi_schedule,
    napi_complete_done,
    napi_disable,
    napi_enable,
    napi_schedule_prep,
)
from guestproc.mm import (
    CHECKSUM_NONE,
    CHECKSUM_PARTIAL,
    CHECKSUM_UNNECESSARY,
    PageAllocator,
    SkbPool,
    SkBuff,
)
from guestproc.netstack import (
    NETDEV_TX_OK,
    NetDevice,
    __netif_tx_trylock,
    __netif_tx_unlock,
    netdev_xmit_more,
    netif_device_attach,
    netif_device_detach,
    netif_stop_subqueue,
    netif_tx_queue_stopped,
    netif_wake_subqueue,
)
from guestproc.virtio import (
    VirtioDriver,
    VirtioFeaturesError,
    virtio_add_status,
    virtio_cread_bytes,
    virtio_device_ready,
    virtio_features_ok,
    virtio_has_feature,
)
from guestproc.virtio_ring import (
    Virtqueue,
    virtqueue_add_inbuf,
    virtqueue_add_outbuf,
    virtqueue_add_sgs,
    virtqueue_detach_unused_buf,
    virtqueue_disable_cb,
    virtqueue_enable_cb_delayed,
    virtqueue_enable_cb_prepare,
    virtqueue_get_buf,
    virtqueue_kick,
    virtqueue_kick_prepare,
    virtqueue_notify,
    virtqueue_poll,
    vring_used_idx_hint,
    vring_used_pending,
)

MAX_SKB_FRAGS = 17
VLAN_HLEN = 4
GOOD_PACKET_LEN = ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN
RX_BUF_SIZE = 2048
MERGEABLE_BUF_LEN = 512
VIRTNET_RESET_TRIES = 3
"""Linux sizes mergeable buffers from the average packet length, never below a full frame,
so on a 1500-byte MTU they never merge; this replica posts 512-byte buffers so that a large
frame really spans several and num_buffers is exercised."""

trace_start_xmit = trace_event("start_xmit")
trace_skb_xmit_done = trace_event("skb_xmit_done")
trace_skb_recv_done = trace_event("skb_recv_done")
trace_free_old_xmit_skbs = trace_event("free_old_xmit_skbs")
trace_receive_buf = trace_event("receive_buf")


class SendQueue:
    """struct send_queue."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"output.{index}"
        self.vq: Virtqueue = None  # type: ignore[assignment]
        self.napi: Napi = None  # type: ignore[assignment]
        self.stats = {"packets": 0, "bytes": 0, "kicks": 0, "xmit_more": 0, "stops": 0,
                      "wakes": 0}


class ReceiveQueue:
    """struct receive_queue; its buffers are a fixed slab in guest RAM."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"input.{index}"
        self.vq: Virtqueue = None  # type: ignore[assignment]
        self.napi: Napi = None  # type: ignore[assignment]
        self.pool: SkbPool = None  # type: ignore[assignment]
        self.buf_len = 0
        self.stats = {"packets": 0, "bytes": 0, "drops": 0, "kicks": 0, "refills": 0,
                      "merged_frames": 0, "merged_buffers": 0}
        self.refill_enabled = True


class VirtnetInfo:
    """struct virtnet_info."""

    def __init__(self, vdev: Any, kernel: Kernel, ram: memoryview, pages: PageAllocator) -> None:
        self.vdev = vdev
        self.kernel = kernel
        self.ram = ram
        self.pages = pages
        self.dev: NetDevice = None  # type: ignore[assignment]
        self.sq: list[SendQueue] = []
        self.rq: list[ReceiveQueue] = []
        self.max_queue_pairs = 1
        self.curr_queue_pairs = 1
        self.has_cvq = False
        self.cvq: Virtqueue | None = None
        self.ctrl = 0  # struct control_buf in guest RAM: hdr(2) status(1) pad mq(2)
        self.hdr_len = 10
        self.mergeable_rx_bufs = False
        self.any_header_sg = False
        self.rx_handler: Callable[[memoryview, int], None] = lambda frame, ip_summed: None
        self.guest_csum = False  # VIRTIO_NET_F_GUEST_CSUM: RX headers may vouch for checksums
        self.zero_hdr = b""
        self.resets = 0
        self.resetting = False
        self.reset_error = ""
        self.ctrl_failures = 0
        self.reset_log: list[dict[str, int]] = []
        """Per reset, monotonic ns: config interrupt, status 0, DRIVER_OK, RX buffers
        posted, queues set; and how many used RX buffers the reset threw away."""


def txq2vq(txq: int) -> int:
    return txq * 2 + 1


def rxq2vq(rxq: int) -> int:
    return rxq * 2


def vq2txq(vq: Virtqueue) -> int:
    return (vq.index - 1) // 2


def vq2rxq(vq: Virtqueue) -> int:
    return vq.index // 2


# -- NAPI glue -----------------------------------------------------------------------------------


def virtqueue_napi_schedule(napi: Napi, vq: Virtqueue) -> None:
    if napi_schedule_prep(napi):
        virtqueue_disable_cb(vq)
        __napi_schedule(napi)


def virtqueue_napi_complete(napi: Napi, vq: Virtqueue, processed: int) -> None:
    opaque = virtqueue_enable_cb_prepare(vq)
    if napi_complete_done(napi, processed):
        if virtqueue_poll(vq, opaque):
            virtqueue_napi_schedule(napi, vq)
    else:
        virtqueue_disable_cb(vq)


# -- TX ------------------------------------------------------------------------------------------


@traced
def skb_xmit_done(vq: Virtqueue) -> None:
    """The TX queue's interrupt callback: suppress further interrupts, let NAPI reclaim."""
    vi: VirtnetInfo = vq.vdev.priv
    if trace_skb_xmit_done.on:
        trace_skb_xmit_done(vq=vq.name, used_idx=vring_used_idx_hint(vq))
    napi = vi.sq[vq2txq(vq)].napi
    virtqueue_disable_cb(vq)
    virtqueue_napi_schedule(napi, vq)


@traced
def free_old_xmit_skbs(sq: SendQueue, in_napi: bool) -> int:
    vq = sq.vq
    r = virtqueue_get_buf(vq)
    if r is None:
        return 0
    pool_free = vq.vdev.priv.skb_pool.kfree_skb
    packets = nbytes = 0
    while r is not None:
        skb = r[0]
        nbytes += skb.len
        pool_free(skb)
        packets += 1
        r = virtqueue_get_buf(vq)
    sq.stats["packets"] += packets
    sq.stats["bytes"] += nbytes
    if trace_free_old_xmit_skbs.on:
        trace_free_old_xmit_skbs(vq=vq.name, packets=packets)
    return packets


@traced
def virtnet_poll_tx(napi: Napi, budget: int) -> int:
    sq: SendQueue = napi.owner  # type: ignore[assignment]
    vi: VirtnetInfo = sq.vq.vdev.priv
    dev = vi.dev
    virtqueue_disable_cb(sq.vq)
    free_old_xmit_skbs(sq, True)
    if sq.vq.num_free >= 2 + MAX_SKB_FRAGS and netif_tx_queue_stopped(dev, sq.index):
        sq.stats["wakes"] += 1
        netif_wake_subqueue(dev, sq.index)
    opaque = virtqueue_enable_cb_prepare(sq.vq)
    done = napi_complete_done(napi, 0)
    if not done:
        virtqueue_disable_cb(sq.vq)
    elif virtqueue_poll(sq.vq, opaque) and napi_schedule_prep(napi):
        virtqueue_disable_cb(sq.vq)
        __napi_schedule(napi)
    return 0



def virtio_net_hdr_from_skb(skb: SkBuff, ram: memoryview, at: int, zero_hdr: bytes) -> None:
    """The header for the frame: NEEDS_CSUM with where the device completes the checksum
    (CHECKSUM_PARTIAL), else all zero."""
    if skb.ip_summed == CHECKSUM_PARTIAL:
        ram[at : at + len(zero_hdr)] = zero_hdr
        VIRTIO_NET_HDR.pack_into(ram, at, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
                                 0, 0, skb.csum_start, skb.csum_offset)
    else:
        ram[at : at + len(zero_hdr)] = zero_hdr


@traced
def xmit_skb(sq: SendQueue, skb: SkBuff) -> int:
    """Prepend the virtio-net header and add the buffers to the ring."""
    vi: VirtnetInfo = sq.vq.vdev.priv
    hdr_len = vi.hdr_len
    ram = vi.ram
    if vi.any_header_sg:  # can_push: the header goes in the headroom, one descriptor
        start = skb.data - hdr_len
        virtio_net_hdr_from_skb(skb, ram, start, vi.zero_hdr)
        return virtqueue_add_outbuf(sq.vq, [(start, skb.len + hdr_len)], skb)
    virtio_net_hdr_from_skb(skb, ram, skb.head, vi.zero_hdr)
    return virtqueue_add_outbuf(sq.vq, [(skb.head, hdr_len), (skb.data, skb.len)], skb)


def check_sq_full_and_disable(vi: VirtnetInfo, dev: NetDevice, sq: SendQueue) -> None:
    if sq.vq.num_free < 2 + MAX_SKB_FRAGS:
        netif_stop_subqueue(dev, sq.index)
        sq.stats["stops"] += 1
        if not virtqueue_enable_cb_delayed(sq.vq):
            virtqueue_napi_schedule(sq.napi, sq.vq)


@traced
def start_xmit(skb: SkBuff, dev: NetDevice) -> int:
    """ndo_start_xmit: reclaim what the device finished, queue this frame, kick if needed."""
    vi: VirtnetInfo = dev.priv
    sq = vi.sq[skb.queue_mapping]
    vq = sq.vq
    kick = not netdev_xmit_more(dev)
    if trace_start_xmit.on:
        trace_start_xmit(dev=dev.name, len=skb.len, vq=vq.name, xmit_more=not kick)
    while True:
        virtqueue_disable_cb(vq)
        free_old_xmit_skbs(sq, False)
        if not kick or virtqueue_enable_cb_delayed(vq):
            break
    err = xmit_skb(sq, skb)
    if err:
        dev.stats["tx_dropped"] += 1
        vi.skb_pool.kfree_skb(skb)
        return NETDEV_TX_OK
    dev.stats["tx_packets"] += 1
    dev.stats["tx_bytes"] += skb.len
    check_sq_full_and_disable(vi, dev, sq)
    if kick or netif_tx_queue_stopped(dev, sq.index):
        if virtqueue_kick_prepare(vq) and virtqueue_notify(vq):
            sq.stats["kicks"] += 1
    else:
        sq.stats["xmit_more"] += 1
    return NETDEV_TX_OK


# -- RX ------------------------------------------------------------------------------------------


@traced
def skb_recv_done(rvq: Virtqueue) -> None:
    """The RX queue's interrupt callback: schedule NAPI, which disables further interrupts."""
    vi: VirtnetInfo = rvq.vdev.priv
    if trace_skb_recv_done.on:
        trace_skb_recv_done(vq=rvq.name, used_idx=vring_used_idx_hint(rvq))
    rq = vi.rq[vq2rxq(rvq)]
    virtqueue_napi_schedule(rq.napi, rvq)


def add_recvbuf_small(vi: VirtnetInfo, rq: ReceiveQueue) -> int:
    buf = rq.pool.alloc_skb()
    if buf is None:
        return -12  # -ENOMEM
    err = virtqueue_add_inbuf(rq.vq, [(buf.data, rq.buf_len)], buf)
    if err:
        rq.pool.kfree_skb(buf)
    return err


def add_recvbuf_mergeable(vi: VirtnetInfo, rq: ReceiveQueue) -> int:
    buf = rq.pool.alloc_skb()
    if buf is None:
        return -12
    err = virtqueue_add_inbuf(rq.vq, [(buf.data, MERGEABLE_BUF_LEN)], buf)
    if err:
        rq.pool.kfree_skb(buf)
    return err


@traced
def try_fill_recv(vi: VirtnetInfo, rq: ReceiveQueue) -> bool:
    """Post RX buffers until the ring is full, then kick if the device wants to know."""
    if not rq.refill_enabled:
        return True
    oom = False
    added = 0
    add = add_recvbuf_mergeable if vi.mergeable_rx_bufs else add_recvbuf_small
    while rq.vq.num_free:
        err = add(vi, rq)
        if err:
            oom = err == -12
            break
        added += 1
    if added:
        rq.stats["refills"] += added
    if virtqueue_kick_prepare(rq.vq) and virtqueue_notify(rq.vq):
        rq.stats["kicks"] += 1
    return not oom


@traced
def receive_buf(vi: VirtnetInfo, rq: ReceiveQueue, buf: SkBuff, length: int) -> None:
    hdr_len = vi.hdr_len
    if length < hdr_len + ETH_HLEN:
        rq.stats["drops"] += 1
        vi.dev.stats["rx_dropped"] += 1
        rq.pool.kfree_skb(buf)
        return
    ram = vi.ram
    ip_summed = CHECKSUM_NONE
    if vi.guest_csum:  # virtio_net_hdr_to_skb
        flags = ram[buf.data]
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            ip_summed = CHECKSUM_PARTIAL
        elif flags & VIRTIO_NET_HDR_F_DATA_VALID:
            ip_summed = CHECKSUM_UNNECESSARY
    if vi.mergeable_rx_bufs:
        num_buffers = VIRTIO_NET_HDR_MRG_RXBUF.unpack_from(ram, buf.data)[6]
        frame = bytearray(ram[buf.data + hdr_len : buf.data + length])
        rq.pool.kfree_skb(buf)
        if num_buffers > 1:  # frames that spanned several buffers, and those buffers
            rq.stats["merged_frames"] += 1
            rq.stats["merged_buffers"] += num_buffers
        for _ in range(num_buffers - 1):
            r = virtqueue_get_buf(rq.vq)
            if r is None:
                rq.stats["drops"] += 1
                vi.dev.stats["rx_dropped"] += 1
                return
            nbuf, nlen = r
            frame += ram[nbuf.data : nbuf.data + nlen]
            rq.pool.kfree_skb(nbuf)
        view = memoryview(frame)
    else:
        view = ram[buf.data + hdr_len : buf.data + length]
    if trace_receive_buf.on:
        trace_receive_buf(vq=rq.vq.name, len=len(view))
    rq.stats["packets"] += 1
    rq.stats["bytes"] += len(view)
    vi.dev.stats["rx_packets"] += 1
    vi.dev.stats["rx_bytes"] += len(view)
    vi.rx_handler(view, ip_summed)
    if not vi.mergeable_rx_bufs:
        rq.pool.kfree_skb(buf)


@traced
def virtnet_receive(rq: ReceiveQueue, budget: int) -> int:
    vi: VirtnetInfo = rq.vq.vdev.priv
    received = 0
    while received < budget:
        r = virtqueue_get_buf(rq.vq)
        if r is None:
            break
        receive_buf(vi, rq, r[0], r[1])
        received += 1
    if rq.vq.num_free > min(budget, rq.vq.num) // 2:
        try_fill_recv(vi, rq)
    return received


def virtnet_poll_cleantx(rq: ReceiveQueue) -> None:
    """Reclaim the paired TX queue's finished skbs from the RX poll (napi_tx), unless
    start_xmit holds that queue: a reply's interrupt then spares the TX one."""
    vi: VirtnetInfo = rq.vq.vdev.priv
    index = vq2rxq(rq.vq)
    sq = vi.sq[index]
    dev = vi.dev
    if not sq.napi.weight or not __netif_tx_trylock(dev, index):
        return
    while True:
        virtqueue_disable_cb(sq.vq)
        free_old_xmit_skbs(sq, True)
        if virtqueue_enable_cb_delayed(sq.vq):
            break
    if sq.vq.num_free >= 2 + MAX_SKB_FRAGS and netif_tx_queue_stopped(dev, index):
        sq.stats["wakes"] += 1
        netif_wake_subqueue(dev, index)
    __netif_tx_unlock(dev, index)


@traced
def virtnet_poll(napi: Napi, budget: int) -> int:
    rq: ReceiveQueue = napi.owner  # type: ignore[assignment]
    virtnet_poll_cleantx(rq)
    received = virtnet_receive(rq, budget)
    if received < budget:
        virtqueue_napi_complete(napi, rq.vq, received)
    return received


# -- reset: the device asked for one (NEEDS_RESET) ----------------------------------------------


def virtnet_freeze_down(vdev: Any) -> None:
    """Stop the stack from transmitting and NAPI from polling the queues about to go."""
    vi: VirtnetInfo = vdev.priv
    netif_device_detach(vi.dev)
    for rq in vi.rq:
        napi_disable(rq.napi)
    for sq in vi.sq:
        napi_disable(sq.napi)


def free_unused_bufs(vi: VirtnetInfo) -> int:
    """Every buffer the driver still holds goes back to its pool, in-flight TX skbs included;
    returns how many of those skbs the device never sent (the replica's count: the ones it
    had used, whose used entries the reset left unread, went out)."""
    unsent = 0
    for sq in vi.sq:
        unsent -= vring_used_pending(sq.vq)
        while (skb := virtqueue_detach_unused_buf(sq.vq)) is not None:
            vi.skb_pool.kfree_skb(skb)
            unsent += 1
    for rq in vi.rq:
        while (buf := virtqueue_detach_unused_buf(rq.vq)) is not None:
            rq.pool.kfree_skb(buf)
    if vi.cvq is not None:
        while virtqueue_detach_unused_buf(vi.cvq) is not None:
            pass
    return unsent


def virtnet_del_vqs(vi: VirtnetInfo) -> None:
    vi.vdev.config.del_vqs(vi.vdev)


def remove_vq_common(vi: VirtnetInfo) -> int:
    """Reset the device first (it stops touching the rings), then take the rings down;
    returns how many TX skbs the reset freed unsent."""
    vi.vdev.config.reset(vi.vdev)
    unsent = free_unused_bufs(vi)
    virtnet_del_vqs(vi)
    return unsent


def virtnet_restore_up(vdev: Any, log: dict[str, int] | None = None) -> None:
    """New rings on the same queues, DRIVER_OK, RX buffers posted, NAPI and TX running."""
    vi: VirtnetInfo = vdev.priv
    virtnet_find_vqs(vi)
    virtio_device_ready(vdev)
    if log is not None:
        log["driver_ok_ns"] = vi.kernel.now_ns()
    for rq in vi.rq:
        napi_enable(rq.napi)
        try_fill_recv(vi, rq)
        virtnet_napi_enable(rq.vq, rq.napi)
    if log is not None:
        log["rx_posted_ns"] = vi.kernel.now_ns()
    for sq in vi.sq:
        napi_enable(sq.napi)
    netif_device_attach(vi.dev)


@traced
def virtnet_reset(vi: VirtnetInfo) -> bool:
    """Linux's virtnet_reset (freeze, reset, the handshake again, restore): the driver
    rebuilds the device's state from nothing; the program above it carries on."""
    vdev = vi.vdev
    vi.resets += 1
    log = {"start_ns": vi.kernel.now_ns()}
    vi.reset_log.append(log)
    virtnet_freeze_down(vdev)
    # frames the device handed over that NAPI had not yet taken: the reset frees their buffers
    log["rx_unprocessed"] = sum(vring_used_pending(rq.vq) for rq in vi.rq)
    log["status0_ns"] = vi.kernel.now_ns()
    log["tx_unsent"] = remove_vq_common(vi)
    try:
        virtio_add_status(vdev, VIRTIO_CONFIG_S_ACKNOWLEDGE)
        virtio_add_status(vdev, VIRTIO_CONFIG_S_DRIVER)
        vdev.config.finalize_features(vdev)
        virtio_features_ok(vdev)
        virtnet_restore_up(vdev, log)
        virtnet_set_queues(vi, vi.curr_queue_pairs)
    except (OSError, VirtioFeaturesError) as e:
        vi.reset_error = f"{type(e).__name__}: {e}"
        virtio_add_status(vdev, VIRTIO_CONFIG_S_FAILED)
        return False
    finally:
        log["end_ns"] = vi.kernel.now_ns()
    return True


def virtnet_config_changed_work(vi: VirtnetInfo) -> None:
    """Read the device status; NEEDS_RESET (the device found the rings broken) -> reset."""
    if vi.resetting:
        return
    vi.resetting = True
    try:
        for _ in range(VIRTNET_RESET_TRIES):
            if not vi.vdev.config.get_status(vi.vdev) & VIRTIO_CONFIG_S_NEEDS_RESET:
                break
            if not virtnet_reset(vi):
                break
    finally:
        vi.resetting = False


def virtnet_config_changed(vdev: Any) -> None:
    """The driver's .config_changed. Linux defers to config_work; this kernel has no
    workqueues, so the work runs at once, in the config interrupt (no other interrupt
    nests in it, and the driver's paths the interrupt can land in hold no ring state)."""
    vi: VirtnetInfo | None = vdev.priv
    if vi is not None:
        virtnet_config_changed_work(vi)


# -- probe ---------------------------------------------------------------------------------------


def virtnet_alloc_queues(vi: VirtnetInfo) -> None:
    vi.sq = [SendQueue(i) for i in range(vi.max_queue_pairs)]
    vi.rq = [ReceiveQueue(i) for i in range(vi.max_queue_pairs)]
    for rq in vi.rq:
        rq.napi = vi.kernel.napi_add(f"virtnet_poll/{rq.name}", virtnet_poll, rq)
    for sq in vi.sq:
        sq.napi = vi.kernel.napi_add(f"virtnet_poll_tx/{sq.name}", virtnet_poll_tx, sq)


@traced
def virtnet_find_vqs(vi: VirtnetInfo) -> None:
    total_vqs = vi.max_queue_pairs * 2 + int(vi.has_cvq)
    callbacks: list[Callable[[Virtqueue], None] | None] = [None] * total_vqs
    names: list[str | None] = [None] * total_vqs
    if vi.has_cvq:
        names[total_vqs - 1] = "control"
    for i in range(vi.max_queue_pairs):
        callbacks[rxq2vq(i)] = skb_recv_done
        callbacks[txq2vq(i)] = skb_xmit_done
        names[rxq2vq(i)] = vi.rq[i].name
        names[txq2vq(i)] = vi.sq[i].name
    vqs = vi.vdev.config.find_vqs(vi.vdev, total_vqs, callbacks, names)
    for i in range(vi.max_queue_pairs):
        vi.rq[i].vq = vqs[rxq2vq(i)]
        vi.sq[i].vq = vqs[txq2vq(i)]
    if vi.has_cvq:
        vi.cvq = vqs[total_vqs - 1]


@traced
def init_vqs(vi: VirtnetInfo) -> None:
    virtnet_alloc_queues(vi)
    virtnet_find_vqs(vi)


def virtnet_napi_enable(vq: Virtqueue, napi: Napi) -> None:
    virtqueue_napi_schedule(napi, vq)


@traced
def virtnet_open(dev: NetDevice) -> None:
    vi: VirtnetInfo = dev.priv
    for rq in vi.rq:
        try_fill_recv(vi, rq)
        virtnet_napi_enable(rq.vq, rq.napi)
    vi.kernel.do_softirq()


CTRL_BUF_SIZE = 1024
"""struct control_buf and the MAC filter buffer, in one block of guest RAM: header, status,
then the command's data."""


@traced
def virtnet_send_command(vi: VirtnetInfo, cls: int, cmd: int, out: list[bytes]) -> bool:
    """A command on the control queue: the header and each ``out`` buffer readable, a status
    byte writable; the driver kicks, then spins on the used ring until the device answers."""
    ram = vi.ram
    hdr, status, at = vi.ctrl, vi.ctrl + 2, vi.ctrl + 4
    VIRTIO_NET_CTRL_HDR.pack_into(ram, hdr, cls, cmd)
    ram[status] = 0xFF
    sgs = [(hdr, VIRTIO_NET_CTRL_HDR.size)]
    for data in out:
        if at + len(data) > vi.ctrl + CTRL_BUF_SIZE:
            return False
        ram[at : at + len(data)] = data
        sgs.append((at, len(data)))
        at += len(data)
    cvq = vi.cvq
    assert cvq is not None
    if virtqueue_add_sgs(cvq, sgs, [(status, 1)], vi) < 0:
        return False
    if not virtqueue_kick(cvq):
        return ram[status] == VIRTIO_NET_OK
    while virtqueue_get_buf(cvq) is None and not cvq.broken:
        vi.kernel.cpu_relax()
    return ram[status] == VIRTIO_NET_OK


@traced
def virtnet_set_rx_mode(dev: NetDevice) -> None:
    """ndo_set_rx_mode: promiscuous and all-multicast on or off, then the MAC filter table
    (the unicast list, then the multicast list), three commands."""
    vi: VirtnetInfo = dev.priv
    if not virtio_has_feature(vi.vdev, VIRTIO_NET_F_CTRL_RX):
        return
    promisc = bool(dev.flags & IFF_PROMISC)
    allmulti = bool(dev.flags & IFF_ALLMULTI)
    if not virtnet_send_command(vi, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC,
                                [bytes([promisc])]):
        vi.ctrl_failures += 1  # dev_warn "Failed to %sable promisc mode."
    if not virtnet_send_command(vi, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI,
                                [bytes([allmulti])]):
        vi.ctrl_failures += 1
    uc = netdev_uc_count(dev).to_bytes(4, "little") + b"".join(dev.uc)
    mc = netdev_mc_count(dev).to_bytes(4, "little") + b"".join(dev.mc)
    if not virtnet_send_command(vi, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
                                [uc, mc]):
        vi.ctrl_failures += 1  # "Failed to set MAC filter table."


def virtnet_set_queues(vi: VirtnetInfo, queue_pairs: int) -> int:
    if not vi.has_cvq or not virtio_has_feature(vi.vdev, VIRTIO_NET_F_MQ):
        return 0
    if not virtnet_send_command(vi, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                                [queue_pairs.to_bytes(2, "little")]):
        return -22
    vi.curr_queue_pairs = queue_pairs
    vi.dev.real_num_tx_queues = queue_pairs
    return 0


@traced
def virtnet_probe(vdev: Any) -> VirtnetInfo:
    vi = VirtnetInfo(vdev, vdev.kernel, vdev.ram, vdev.pages)
    vdev.priv = vi
    if virtio_has_feature(vdev, VIRTIO_NET_F_MAC):
        mac = virtio_cread_bytes(vdev, 0, 6)
    else:
        mac = bytes.fromhex("525400123456")
    vi.has_cvq = virtio_has_feature(vdev, VIRTIO_NET_F_CTRL_VQ)
    if vi.has_cvq and virtio_has_feature(vdev, VIRTIO_NET_F_MQ):
        vi.max_queue_pairs = max(1, VIRTIO_NET_CONFIG.unpack(virtio_cread_bytes(vdev, 0, 10))[2])
    vi.dev = dev = NetDevice("eth0", mac, vi.max_queue_pairs)
    dev.real_num_tx_queues = 1
    dev.priv = vi
    dev.ndo_start_xmit = start_xmit
    dev.ndo_open = virtnet_open
    dev.ndo_set_rx_mode = virtnet_set_rx_mode
    vi.mergeable_rx_bufs = virtio_has_feature(vdev, VIRTIO_NET_F_MRG_RXBUF)
    version_1 = virtio_has_feature(vdev, VIRTIO_F_VERSION_1)
    vi.hdr_len = virtio_net_hdr_len(vi.mergeable_rx_bufs or version_1)
    vi.zero_hdr = bytes(vi.hdr_len)
    vi.any_header_sg = virtio_has_feature(vdev, VIRTIO_F_ANY_LAYOUT) or version_1
    dev.hw_csum = virtio_has_feature(vdev, VIRTIO_NET_F_CSUM)
    vi.guest_csum = virtio_has_feature(vdev, VIRTIO_NET_F_GUEST_CSUM)
    if virtio_has_feature(vdev, VIRTIO_NET_F_STATUS):
        vi.link_status = VIRTIO_NET_CONFIG.unpack(virtio_cread_bytes(vdev, 0, 10))[1]
    init_vqs(vi)
    ring = vi.sq[0].vq.num
    vi.skb_pool = SkbPool(vi.pages, ring * 2 * vi.max_queue_pairs)
    if vi.has_cvq:
        vi.ctrl = vi.pages.alloc(CTRL_BUF_SIZE, 64)
    for rq in vi.rq:
        rq.pool = SkbPool(vi.pages, rq.vq.num)
        rq.buf_len = vi.hdr_len + GOOD_PACKET_LEN
    virtio_device_ready(vdev)
    virtnet_set_queues(vi, vi.max_queue_pairs)
    return vi


virtio_net_driver = VirtioDriver(
    name="virtio_net",
    feature_table=[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
                   VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
                   VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_CTRL_RX,
                   VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_MQ,
                   VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_RING_F_EVENT_IDX,
                   VIRTIO_RING_F_INDIRECT_DESC],
    feature_table_legacy=[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
                          VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_MAC,
                          VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CTRL_VQ,
                          VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VLAN,
                          VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_MQ,
                          VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_RING_F_EVENT_IDX,
                          VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_F_ANY_LAYOUT],
    probe=virtnet_probe,
    config_changed=virtnet_config_changed,
)
