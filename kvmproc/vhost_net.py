"""Stands for drivers/vhost/net.c: vhost-net, the in-kernel virtio-net data path.

Runs in the worker process ``vhost-<QEMU pid>`` (kvmproc/vhost_worker.py), one per open of
the KVM process's ``/dev/vhost-net`` (kvmproc/vhost_net_misc.py): ``vhost_net_open`` makes
a ``VhostNet`` with an RX and a TX queue, the forwarded ioctls set it up, and when the file
goes (QEMU closed it, or died and the kernel closed it) ``vhost_net_release`` stops the
worker and drops the tap.

TX: a kick (the KVM ioeventfd) queues ``handle_tx``: ``vhost_get_vq_desc`` for each chain
the guest made available, the vnet header and frame written to the tap, the used entries
published and the guest signalled once per VHOST_NET_BATCH (``vhost_net_signal_used``);
before turning kicks back on it busy-polls the ring for ``busyloop_timeout`` microseconds
(``vhost_net_busy_poll``, QEMU's ``poll-us``). A tap that would block parks the chain back
on the ring and polls the tap for POLLOUT. RX: the tap's POLLIN (or a refill kick) queues
``handle_rx``: each frame read from the tap goes into the buffers ``get_rx_bufs`` takes.
"""

from __future__ import annotations

import os
import select
import stat
import struct
import time
from typing import Any

from common.notifier import EventNotifier
from common.trace import trace_event, traced
from common.vhost_abi import (
    VHOST_GET_FEATURES,
    VHOST_GET_STATS,
    VHOST_GET_VRING_BASE,
    VHOST_NET_F_VIRTIO_NET_HDR,
    VHOST_NET_SET_BACKEND,
    VHOST_RESET_OWNER,
    VHOST_SET_FEATURES,
    VHOST_SET_MEM_TABLE,
    VHOST_SET_OWNER,
    VHOST_SET_VRING_ADDR,
    VHOST_SET_VRING_BASE,
    VHOST_SET_VRING_BUSYLOOP_TIMEOUT,
    VHOST_SET_VRING_CALL,
    VHOST_SET_VRING_ERR,
    VHOST_SET_VRING_KICK,
    VHOST_SET_VRING_NUM,
)
from common.virtio_abi import (
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    virtio_net_hdr_len,
)
from kvmproc.vhost import (
    EFAULT,
    EINVAL,
    ENOBUFS,
    UIO_MAXIOV,
    VhostDev,
    VhostPoll,
    VhostVirtqueue,
    VhostWork,
    vhost_add_used_and_signal_n,
    vhost_disable_notify,
    vhost_discard_vq_desc,
    vhost_enable_notify,
    vhost_get_vq_desc,
    vhost_vq_avail_empty,
    vhost_vq_init_access,
)

VHOST_NET_VQ_RX = 0
VHOST_NET_VQ_TX = 1
VHOST_NET_VQ_MAX = 2
VHOST_NET_BATCH = 64
VHOST_NET_WEIGHT = 0x80000
VHOST_NET_PKT_WEIGHT = 256
VHOST_NET_FEATURES = ((1 << VIRTIO_F_NOTIFY_ON_EMPTY) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                      | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_ANY_LAYOUT)
                      | (1 << VIRTIO_F_VERSION_1) | (1 << VHOST_NET_F_VIRTIO_NET_HDR)
                      | (1 << VIRTIO_NET_F_MRG_RXBUF))
EBUSY = 16
ENOTSOCK = 88
EOPNOTSUPP = 95
TUN_MAJOR, TUN_MINOR = 10, 200
RX_BUFSIZE = 65536 + 64

trace_handle_tx = trace_event("handle_tx")
trace_handle_rx = trace_event("handle_rx")
trace_tun_sendmsg = trace_event("tun_sendmsg")
trace_tun_recvmsg = trace_event("tun_recvmsg")


class VhostNetVirtqueue:
    """struct vhost_net_virtqueue: a queue, its header split and its batch of used heads."""

    def __init__(self, vq: VhostVirtqueue) -> None:
        self.vq = vq
        self.vhost_hlen = 0
        self.sock_hlen = 0
        self.heads: list[tuple[int, int]] = []  # used entries not yet published (done_idx)
        self.packets = 0
        self.batches = 0
        self.would_block = 0
        self.dropped = 0


class VhostNet:
    """struct vhost_net: the device one open of /dev/vhost-net gives."""

    def __init__(self) -> None:
        self.dev = VhostDev(VHOST_NET_VQ_MAX, [handle_rx_kick, handle_tx_kick])
        self.vqs = [VhostNetVirtqueue(vq) for vq in self.dev.vqs]
        self.poll = [VhostPoll(self.dev, handle_rx_net, select.POLLIN, "handle_rx_net"),
                     VhostPoll(self.dev, handle_tx_net, select.POLLOUT, "handle_tx_net")]
        self.dev.file_polls.extend(self.poll)
        self.rx_buf = bytearray(RX_BUFSIZE)
        self.rx_pending = 0  # length of a frame read from the tap, not yet in guest buffers

    def describe(self) -> dict[str, Any]:
        return {"owner": self.dev.owner, "worker": f"vhost-{self.dev.owner}",
                "features": hex(self.dev.acked_features), "works_run": self.dev.works_run,
                "vqs": [{**n.vq.describe(), "packets": n.packets, "batches": n.batches,
                         "would_block": n.would_block, "dropped": n.dropped,
                         "sock_hlen": n.sock_hlen} for n in self.vqs]}


_work_owner: dict[int, VhostNet] = {}
"""container_of(work, struct vhost_net, ...): the device a work belongs to."""


def handle_tx_kick(work: VhostWork) -> None:
    handle_tx(_work_owner[id(work)])


def handle_rx_kick(work: VhostWork) -> None:
    handle_rx(_work_owner[id(work)])


def handle_tx_net(work: VhostWork) -> None:
    handle_tx(_work_owner[id(work)])


def handle_rx_net(work: VhostWork) -> None:
    handle_rx(_work_owner[id(work)])


def vhost_net_open() -> VhostNet:
    n = VhostNet()
    for vq in n.dev.vqs:
        _work_owner[id(vq.poll.work)] = n
    for p in n.poll:
        _work_owner[id(p.work)] = n
    return n


def vhost_net_enable_vq(n: VhostNet, vq: VhostVirtqueue) -> None:
    """Watch the backend (the tap) for this queue: POLLIN for RX, POLLOUT for TX."""
    if vq.private_data is not None:
        n.poll[vq.index].vhost_poll_start(fd=vq.private_data)


def vhost_net_disable_vq(n: VhostNet, vq: VhostVirtqueue) -> None:
    n.poll[vq.index].vhost_poll_stop()


def vhost_net_signal_used(nvq: VhostNetVirtqueue) -> None:
    if nvq.heads:
        vhost_add_used_and_signal_n(nvq.vq.dev, nvq.vq, nvq.heads)
        nvq.batches += 1
        nvq.heads.clear()


def vhost_exceeds_weight(vq: VhostVirtqueue, pkts: int, total_len: int) -> bool:
    """Enough for one go: requeue the work so other queues get the worker too."""
    if pkts >= VHOST_NET_PKT_WEIGHT or total_len >= VHOST_NET_WEIGHT:
        vq.poll.vhost_poll_queue()
        return True
    return False


def sock_has_rx_data(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def vhost_net_busy_poll_try_queue(n: VhostNet, vq: VhostVirtqueue) -> None:
    dev = n.dev
    if not vhost_vq_avail_empty(dev, vq):
        vq.poll.vhost_poll_queue()
    elif vhost_enable_notify(dev, vq):
        vhost_disable_notify(dev, vq)
        vq.poll.vhost_poll_queue()


@traced
def vhost_net_busy_poll(n: VhostNet, rvq: VhostVirtqueue, tvq: VhostVirtqueue,
                        busyloop_intr: list[bool], poll_rx: bool) -> None:
    """Spin (kicks and the other queue's notifications off) for busyloop_timeout us until
    the guest adds buffers, the tap has a frame for a posted buffer, or other work comes."""
    dev = n.dev
    vq = tvq if poll_rx else rvq
    vhost_disable_notify(dev, vq)
    fd = rvq.private_data
    timeout_us = rvq.busyloop_timeout if poll_rx else tvq.busyloop_timeout
    tvq.stats["busypolls"] += 1
    end = time.monotonic_ns() + timeout_us * 1000
    while time.monotonic_ns() < end:
        if dev.vhost_has_work():
            busyloop_intr[0] = True
            break
        if (fd is not None and sock_has_rx_data(fd) and not vhost_vq_avail_empty(dev, rvq)) \
                or not vhost_vq_avail_empty(dev, tvq):
            tvq.stats["busypoll_hits"] += 1
            break
    if poll_rx or (fd is not None and sock_has_rx_data(fd)):
        vhost_net_busy_poll_try_queue(n, vq)
    elif not poll_rx:  # on TX here, the tap has nothing to receive
        vhost_enable_notify(dev, rvq)


def vhost_net_tx_get_vq_desc(n: VhostNet, nvq: VhostNetVirtqueue, out: list[memoryview],
                             inn: list[memoryview], busyloop_intr: list[bool]) -> int:
    tvq = nvq.vq
    r = vhost_get_vq_desc(tvq, out, inn)
    if r == tvq.num and tvq.busyloop_timeout:
        vhost_net_signal_used(nvq)  # flush the batch before spinning (vhost_tx_batch)
        vhost_net_busy_poll(n, n.dev.vqs[VHOST_NET_VQ_RX], tvq, busyloop_intr, False)
        r = vhost_get_vq_desc(tvq, out, inn)
    return r


@traced
def handle_tx(n: VhostNet) -> None:
    """Expects to be always run from the worker, with the queue's mutex held."""
    nvq = n.vqs[VHOST_NET_VQ_TX]
    vq = nvq.vq
    fd = vq.private_data
    if fd is None or vq.views is None:
        return
    if trace_handle_tx.on:
        trace_handle_tx(avail_idx=vq.views.avail[1], last_avail_idx=vq.last_avail_idx)
    vhost_disable_notify(n.dev, vq)
    vhost_net_disable_vq(n, vq)
    handle_tx_copy(n, nvq, fd)


def handle_tx_copy(n: VhostNet, nvq: VhostNetVirtqueue, fd: int) -> None:
    """do { ... } while (!vhost_exceeds_weight(...)): a ``continue`` tests the weight too."""
    vq = nvq.vq
    dev = n.dev
    out: list[memoryview] = []
    inn: list[memoryview] = []
    busyloop_intr = [False]
    sent_pkts = total_len = 0
    heads = nvq.heads
    writev = os.writev
    while True:
        busyloop_intr[0] = False
        head = vhost_net_tx_get_vq_desc(n, nvq, out, inn, busyloop_intr)
        if head < 0:
            break
        if head == vq.num:
            if busyloop_intr[0]:
                vq.poll.vhost_poll_queue()
            elif vhost_enable_notify(dev, vq):  # they slipped one in: check again
                vhost_disable_notify(dev, vq)
                sent_pkts += 1
                if vhost_exceeds_weight(vq, sent_pkts, total_len):
                    break
                continue
            break
        if inn:
            vq.vq_err(f"Unexpected descriptor format for TX: out {len(out)}, int {len(inn)}")
            break
        if trace_tun_sendmsg.on:
            trace_tun_sendmsg(head=head, len=sum(len(m) for m in out))
        try:
            length = writev(fd, out)
        except BlockingIOError:
            vhost_discard_vq_desc(vq, 1)
            nvq.would_block += 1
            vhost_net_enable_vq(n, vq)
            break
        except OSError:  # the tap refused the frame (a bad header): dropped, completed
            length = 0
            nvq.dropped += 1
        heads.append((head, 0))
        nvq.packets += 1
        if len(heads) >= VHOST_NET_BATCH:
            vhost_net_signal_used(nvq)
        sent_pkts += 1
        total_len += length
        if vhost_exceeds_weight(vq, sent_pkts, total_len):
            break
    vhost_net_signal_used(nvq)


def get_rx_bufs(vq: VhostVirtqueue, datalen: int, quota: int, iov: list[memoryview],
                heads: list[tuple[int, int]]) -> int:
    """Take guest buffers for ``datalen`` bytes: the number of heads, 0 if there are not
    enough yet, UIO_MAXIOV + 1 if the frame cannot fit, negative on a ring error. Except on
    success every head taken is given back (``err:``: vhost_discard_vq_desc)."""
    out: list[memoryview] = []
    inn: list[memoryview] = []
    headcount = 0
    iov.clear()
    heads.clear()
    r = 0
    while datalen > 0 and headcount < quota:
        if len(iov) >= UIO_MAXIOV:
            r = -ENOBUFS
            break
        d = vhost_get_vq_desc(vq, out, inn)
        if d < 0:
            r = d
            break
        if d == vq.num:
            r = 0
            break
        if out or not inn:
            vq.vq_err(f"unexpected descriptor format for RX: out {len(out)}, in {len(inn)}")
            r = -EINVAL
            break
        length = sum(len(m) for m in inn)
        heads.append((d, min(length, datalen)))
        iov.extend(inn)
        datalen -= length
        headcount += 1
    else:
        if datalen <= 0:
            return headcount
        r = UIO_MAXIOV + 1  # overrun
    vhost_discard_vq_desc(vq, headcount)
    return r


def vhost_net_rx_peek_head_len(n: VhostNet, fd: int, busyloop_intr: list[bool]) -> int:
    """The length of the tap's next frame (with its vnet header), 0 if there is none; the
    frame waits in the device's buffer until guest buffers take it. Before busy-polling,
    the batched used heads go to the guest."""
    if n.rx_pending:
        return n.rx_pending
    try:
        n.rx_pending = os.readv(fd, [n.rx_buf])
    except (BlockingIOError, InterruptedError):
        rnvq = n.vqs[VHOST_NET_VQ_RX]
        rvq = rnvq.vq
        if not rvq.busyloop_timeout:
            return 0
        vhost_net_signal_used(rnvq)  # flush batched heads first
        vhost_net_busy_poll(n, rvq, n.dev.vqs[VHOST_NET_VQ_TX], busyloop_intr, True)
        try:
            n.rx_pending = os.readv(fd, [n.rx_buf])
        except (BlockingIOError, InterruptedError):
            return 0
    return n.rx_pending


def rx_copy_to_bufs(buf: memoryview, sock_len: int, iov: list[memoryview]) -> None:
    """The frame (vnet header first) into the guest's buffers: the recvmsg into the iovecs."""
    copied = 0
    for m in iov:
        take = min(len(m), sock_len - copied)
        m[:take] = buf[copied : copied + take]
        copied += take
        if copied == sock_len:
            break


@traced
def handle_rx(n: VhostNet) -> None:
    """Expects to be always run from the worker, with the queue's mutex held. A frame the
    guest's buffers cannot hold is dropped (the 1-byte MSG_TRUNC read: here the frame
    already read leaves the device's buffer) and its heads go back to the ring."""
    nvq = n.vqs[VHOST_NET_VQ_RX]
    vq = nvq.vq
    dev = n.dev
    fd = vq.private_data
    if fd is None or vq.views is None:
        return
    vhost_disable_notify(dev, vq)
    vhost_net_disable_vq(n, vq)
    mergeable = dev.vhost_has_feature(VIRTIO_NET_F_MRG_RXBUF)
    quota = UIO_MAXIOV if mergeable else 1
    busyloop_intr = [False]
    iov: list[memoryview] = []
    got: list[tuple[int, int]] = []
    recv_pkts = total_len = 0
    sock_len = 0
    buf = memoryview(n.rx_buf)
    while True:  # do { ... } while (!vhost_exceeds_weight(...)): a `continue` tests weight
        sock_len = vhost_net_rx_peek_head_len(n, fd, busyloop_intr)
        if not sock_len:
            break
        if trace_handle_rx.on:
            trace_handle_rx(len=sock_len, avail_idx=vq.views.avail[1])
        vhost_len = sock_len + nvq.vhost_hlen
        headcount = get_rx_bufs(vq, vhost_len, quota, iov, got)
        if headcount < 0:  # on error, stop handling until the next kick
            vhost_net_signal_used(nvq)
            return
        if headcount == 0:
            if busyloop_intr[0]:
                vq.poll.vhost_poll_queue()
            elif vhost_enable_notify(dev, vq):  # they slipped one in: check again
                vhost_disable_notify(dev, vq)
                recv_pkts += 1
                if vhost_exceeds_weight(vq, recv_pkts, total_len):
                    break
                continue
            vhost_net_signal_used(nvq)  # nothing new: wait for the refill kick
            return
        busyloop_intr[0] = False
        n.rx_pending = 0
        if trace_tun_recvmsg.on:
            trace_tun_recvmsg(len=sock_len, heads=headcount)
        if headcount > UIO_MAXIOV:  # on overrun, truncate and discard
            nvq.dropped += 1
        else:
            rx_copy_to_bufs(buf, sock_len, iov)
            if mergeable:  # num_buffers, after the 10-byte virtio_net_hdr
                struct.pack_into("<H", iov[0], 10, headcount)
            nvq.heads.extend(got)
            nvq.packets += 1
            if len(nvq.heads) > VHOST_NET_BATCH:
                vhost_net_signal_used(nvq)
            total_len += vhost_len
        recv_pkts += 1
        if vhost_exceeds_weight(vq, recv_pkts, total_len):
            break
    if busyloop_intr[0]:
        vq.poll.vhost_poll_queue()
    elif not sock_len:
        vhost_net_enable_vq(n, vq)
    vhost_net_signal_used(nvq)


# -- the ioctls ----------------------------------------------------------------------------------


def is_tap(fd: int) -> bool:
    """tun_get_socket: the fd must be a tun/tap file."""
    st = os.fstat(fd)
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (
        TUN_MAJOR, TUN_MINOR)


def vhost_net_set_backend(n: VhostNet, index: int, fd: int) -> int:
    if index >= VHOST_NET_VQ_MAX:
        return -ENOBUFS
    if fd >= 0 and not is_tap(fd):
        os.close(fd)
        return -ENOTSOCK
    vq = n.dev.vqs[index]
    old = vq.private_data
    if fd >= 0 and not n.dev.vq_access_ok(vq):
        os.close(fd)
        return -EFAULT
    vhost_net_disable_vq(n, vq)
    n.vqs[index].heads.clear()
    vq.private_data = fd if fd >= 0 else None
    vhost_vq_init_access(vq)
    vhost_net_enable_vq(n, vq)  # vhost_poll_start: a ready tap queues the first pass
    if old is not None:  # each queue holds its own reference to the tap
        os.close(old)
    return 0


def vhost_net_set_features(n: VhostNet, features: int) -> int:
    if features & ~VHOST_NET_FEATURES:
        return -EOPNOTSUPP
    hdr_len = virtio_net_hdr_len(bool(features & ((1 << VIRTIO_NET_F_MRG_RXBUF)
                                                  | (1 << VIRTIO_F_VERSION_1))))
    if features & (1 << VHOST_NET_F_VIRTIO_NET_HDR):
        vhost_hlen, sock_hlen = hdr_len, 0
    else:
        vhost_hlen, sock_hlen = 0, hdr_len
    n.dev.acked_features = features
    for nvq in n.vqs:
        nvq.vhost_hlen = vhost_hlen
        nvq.sock_hlen = sock_hlen
    return 0


def vhost_vring_ioctl(n: VhostNet, op: str, idx: int, args: list, allowed: set[str]) -> int:
    dev = n.dev
    if not isinstance(idx, int) or not 0 <= idx < len(dev.vqs):
        return -ENOBUFS
    vq = dev.vqs[idx]
    if op == VHOST_SET_VRING_NUM:
        num = args[0]
        if vq.private_data is not None:
            return -EBUSY
        if not isinstance(num, int) or not num or num > 32768 or num & (num - 1):
            return -EINVAL
        vq.num = num
    elif op == VHOST_SET_VRING_BASE:
        if vq.private_data is not None:
            return -EBUSY
        vq.last_avail_idx = vq.avail_idx = args[0] & 0xFFFF
    elif op == VHOST_SET_VRING_ADDR:
        desc, avail, used = args[:3]
        vq.desc_addr, vq.avail_addr, vq.used_addr = desc, avail, used
        if vq.private_data is not None and not dev.vq_access_ok(vq):
            return -EINVAL
    elif op == VHOST_SET_VRING_KICK:
        name = args[0]
        if name is not None and name not in allowed:
            return -EINVAL
        vq.poll.vhost_poll_stop()
        vq.kick = EventNotifier(name) if name is not None else None
        if vq.kick is not None:
            vq.poll.vhost_poll_start(notifier=vq.kick)
    elif op == VHOST_SET_VRING_CALL:
        name = args[0]
        if name is not None and name not in allowed:
            return -EINVAL
        if vq.call_ctx is not None:
            vq.call_ctx.close()
        vq.call_ctx = EventNotifier(name) if name is not None else None
    elif op == VHOST_SET_VRING_ERR:
        name = args[0]
        if name is not None and name not in allowed:
            return -EINVAL
        if vq.error_ctx is not None:
            vq.error_ctx.close()
        vq.error_ctx = EventNotifier(name) if name is not None else None
    elif op == VHOST_SET_VRING_BUSYLOOP_TIMEOUT:
        vq.busyloop_timeout = max(0, int(args[0]))
    else:
        return -EINVAL
    return 0


def vhost_net_ioctl(n: VhostNet, req: list, fds: list[int], pid: int,
                    allowed: set[str], ram: str) -> list:
    """One ioctl on the open file: [ret, payload]."""
    op = req[0] if req and isinstance(req[0], str) else None
    dev = n.dev
    with dev.lock:
        if op == VHOST_NET_SET_BACKEND:
            fd = fds.pop(0) if fds else -1
            return [vhost_net_set_backend(n, req[1], fd), None]
        if op == VHOST_GET_FEATURES:
            return [0, VHOST_NET_FEATURES]
        if op == VHOST_SET_FEATURES:
            return [vhost_net_set_features(n, req[1]), None]
        if op == VHOST_SET_OWNER:
            return [dev.vhost_dev_set_owner(pid), None]
        if op == VHOST_RESET_OWNER:
            return [-EOPNOTSUPP, None]
        if not dev.owner:
            return [-1, None]  # -EPERM: every other ioctl needs an owner
        if op == VHOST_SET_MEM_TABLE:
            return [dev.vhost_set_memory(req[1], {ram}), None]
        if op == VHOST_GET_VRING_BASE:
            idx = req[1]
            if not isinstance(idx, int) or not 0 <= idx < len(dev.vqs):
                return [-ENOBUFS, None]
            return [0, dev.vqs[idx].last_avail_idx]
        if op == VHOST_GET_STATS:
            return [0, n.describe()]
        if op in (VHOST_SET_VRING_NUM, VHOST_SET_VRING_BASE, VHOST_SET_VRING_ADDR,
                  VHOST_SET_VRING_KICK, VHOST_SET_VRING_CALL, VHOST_SET_VRING_ERR,
                  VHOST_SET_VRING_BUSYLOOP_TIMEOUT):
            return [vhost_vring_ioctl(n, op, req[1], req[2:], allowed), None]
    return [-EINVAL, None]


def vhost_net_release(n: VhostNet) -> None:
    """The last reference to the file went: stop the worker, drop the backends."""
    with n.dev.lock:
        for vq in n.dev.vqs:
            vhost_net_disable_vq(n, vq)
    n.dev.vhost_dev_stop()
    n.dev.vhost_dev_cleanup()
    fds = {vq.private_data for vq in n.dev.vqs if vq.private_data is not None}
    for vq in n.dev.vqs:
        vq.private_data = None
    for fd in fds:
        os.close(fd)
    for work in [vq.poll.work for vq in n.dev.vqs] + [p.work for p in n.poll]:
        _work_owner.pop(id(work), None)
