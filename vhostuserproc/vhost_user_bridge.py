"""Stands for tests/vhost-user-bridge.c: a virtio-net device on libvhost-user whose host
side is the run's tap or libslirp (vhostuserproc/net_backend.py) instead of a UDP socket.

Queue 2n is pair n's receive queue, 2n+1 its transmit queue. ``vubr_handle_tx`` runs on the
transmit queue's kick: it pops each chain, sends the frame (vnet header and all to the tap,
stripped for slirp), and gives the chain back. ``vubr_backend_recv_cb`` runs when the host
side has frames: each is copied into as many receive buffers as it needs (one without
MRG_RXBUF; with it ``num_buffers`` says how many, where vhost-user-bridge fills one). A frame
the ring has no room for waits, the tap is not read meanwhile, and the receive queue's kick
(``vubr_handle_rx``, QEMU's virtio_net_handle_rx) brings it in.

With ``poll`` the device runs as a DPDK backend does: notifications off on every queue,
no kick watched, and ``vubr_poll`` called from a busy loop.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable
from typing import Protocol

from common.vhost_user_abi import VhostUserMsg, VhostUserRequest
from common.virtio_abi import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
)
from vhostuserproc.libvhost_user import (
    vu_queue_avail_bytes,
    vu_queue_empty,
    vu_queue_fill,
    vu_queue_flush,
    vu_queue_notify,
    vu_queue_pop,
    vu_queue_push,
    vu_queue_set_notification,
    vu_set_queue_handler,
)
from vhostuserproc.vu_dev import VuDev

RX_BATCH = 64
"""Frames taken from the host side per wakeup, not to starve the other fds."""


class HostSide(Protocol):
    with_hdr: bool

    def set_vnet_hdr_len(self, length: int) -> None: ...
    def send(self, pair: int, sg: list[memoryview], hdrlen: int) -> bool: ...


class QueueStats:
    """Frames and bytes one queue moved, and its kicks and calls."""

    __slots__ = ("frames", "bytes", "dropped")

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0
        self.dropped = 0


class VubrDev:
    """``VubrDev``: the device, its host side and what each queue moved."""

    def __init__(self, pairs: int, backend: HostSide, poll: bool = False,
                 watch_backend: Callable[[int, bool], None] | None = None) -> None:
        self.pairs = pairs
        self.max_queues = 2 * pairs
        self.backend = backend
        self.poll = poll
        self.hdrlen = 12
        self.mrg_rxbuf = False
        self.vudev: VuDev | None = None
        self.stats = [QueueStats() for _ in range(self.max_queues)]
        self.held: list[deque[bytes]] = [deque() for _ in range(pairs)]
        self.watch_backend = watch_backend or (lambda pair, on: None)
        self.quit = False
        self.panics: list[str] = []
        self.hdr_zero = bytes(12)

    # -- VuDevIface ---------------------------------------------------------------------------

    def get_features(self, dev: VuDev) -> int:
        f = 1 << VIRTIO_NET_F_GUEST_ANNOUNCE | 1 << VIRTIO_NET_F_MRG_RXBUF \
            | 1 << VIRTIO_F_VERSION_1
        if self.pairs > 1:
            f |= 1 << VIRTIO_NET_F_MQ
        return f

    def set_features(self, dev: VuDev, features: int) -> None:
        """vubr_set_features: the header is 12 bytes with VERSION_1 or MRG_RXBUF, else 10."""
        self.mrg_rxbuf = bool(features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        if features >> VIRTIO_F_VERSION_1 & 1 or self.mrg_rxbuf:
            self.hdrlen = 12
        else:
            self.hdrlen = 10
        self.hdr_zero = bytes(self.hdrlen)
        self.backend.set_vnet_hdr_len(self.hdrlen)

    def get_protocol_features(self, dev: VuDev) -> int:
        return 0

    def process_msg(self, dev: VuDev, vmsg: VhostUserMsg) -> bool | None:
        """vubr_process_msg: SEND_RARP is taken and ignored; the rest goes to the library."""
        if vmsg.request == VhostUserRequest.SEND_RARP:
            return False
        return None

    def queue_set_started(self, dev: VuDev, qidx: int, started: bool) -> None:
        """vubr_queue_set_started: the transmit queue's kick runs vubr_handle_tx, the
        receive queue's vubr_handle_rx; in poll mode no kick is watched."""
        vq = dev.vq[qidx]
        if self.poll:
            if started:
                vu_queue_set_notification(dev, vq, False)
            return
        handler = (self.vubr_handle_tx if qidx % 2 else self.vubr_handle_rx) if started else None
        vu_set_queue_handler(dev, vq, handler)
        if qidx % 2 == 0:
            self.watch_backend(qidx // 2, started)

    def queue_is_processed_in_order(self, dev: VuDev, qidx: int) -> bool:
        return True

    def vubr_panic(self, dev: VuDev, msg: str) -> None:
        print(f"PANIC: {msg}", file=sys.stderr, flush=True)
        self.panics.append(msg)

    # -- the data path ------------------------------------------------------------------------

    def vubr_handle_tx(self, dev: VuDev, qidx: int) -> None:
        """Every chain on the transmit queue to the host side, with kicks off meanwhile and
        a last look after they are back on (QEMU's virtio_net_flush_tx pattern)."""
        vq = dev.vq[qidx]
        if not vq.enable:  # SET_VRING_ENABLE 0: the front-end took the pair away
            return
        pair = qidx >> 1
        st = self.stats[qidx]
        send = self.backend.send
        hdrlen = self.hdrlen
        while True:
            if not self.poll:
                vu_queue_set_notification(dev, vq, False)
            n = 0
            while True:
                elem = vu_queue_pop(dev, vq)
                if elem is None:
                    break
                sg = elem.out_sg
                if sg:
                    if send(pair, sg, hdrlen):
                        st.frames += 1
                        for mv in sg:
                            st.bytes += len(mv)
                        st.bytes -= hdrlen
                    else:
                        st.dropped += 1
                else:
                    st.dropped += 1
                vu_queue_push(dev, vq, elem, 0)
                n += 1
            if n:
                vu_queue_notify(dev, vq)
            if self.poll or dev.broken:
                return
            vu_queue_set_notification(dev, vq, True)
            if vu_queue_empty(dev, vq):
                return

    def vubr_handle_rx(self, dev: VuDev, qidx: int) -> None:
        """The guest gave receive buffers: the frames that waited for them go in, and the
        host side is read again."""
        pair = qidx >> 1
        if self.vubr_flush_held(pair):
            self.watch_backend(pair, True)

    def vubr_flush_held(self, pair: int) -> bool:
        """Deliver the frames waiting for this pair; True when none is left."""
        held = self.held[pair]
        while held:
            if not self.vubr_receive(pair, held[0], self.backend.with_hdr):
                return False
            held.popleft()
        return True

    def vubr_backend_recv_cb(self, pair: int, recv: Callable[[int], memoryview | None]) -> None:
        """Frames the tap has for this pair into its receive queue, until it has none or
        the ring is full (the frame then waits and the tap is not watched)."""
        if self.held[pair] and not self.vubr_flush_held(pair):
            self.watch_backend(pair, False)
            return
        for _ in range(RX_BATCH):
            frame = recv(pair)
            if frame is None:
                return
            if not self.vubr_receive(pair, frame, True):
                self.held[pair].append(bytes(frame))
                self.watch_backend(pair, False)
                return

    def vubr_receive(self, pair: int, data: memoryview | bytes, with_hdr: bool) -> bool:
        """One frame into the receive queue: False (nothing taken) when the queue is not
        running or has too little room."""
        dev = self.vudev
        if dev is None or dev.broken:
            return False
        qidx = pair << 1
        vq = dev.vq[qidx]
        if not vq.enable or not vq.started or not vq.ready:
            return False
        hdrlen = self.hdrlen
        src = data if with_hdr else self.hdr_zero + data
        size = len(src)
        if size < hdrlen:
            return True
        if not vu_queue_avail_bytes(dev, vq, size if self.mrg_rxbuf else hdrlen, 0):
            if not self.poll:
                vu_queue_set_notification(dev, vq, True)
                if not vu_queue_avail_bytes(dev, vq, size if self.mrg_rxbuf else hdrlen, 0):
                    return False
            else:
                return False
        off = 0
        i = 0
        first_sg: list[memoryview] | None = None
        while off < size:
            elem = vu_queue_pop(dev, vq)
            if elem is None:
                break
            written = 0
            for mv in elem.in_sg:
                n = min(len(mv), size - off)
                if n <= 0:
                    break
                mv[:n] = src[off : off + n]
                off += n
                written += n
            if i == 0:
                first_sg = elem.in_sg
            vu_queue_fill(dev, vq, elem, written, i)
            i += 1
            if not self.mrg_rxbuf:
                break
        if not i:
            return True
        if self.mrg_rxbuf and first_sg is not None:
            iov_from_buf(first_sg, 10, i.to_bytes(2, "little"))
        vu_queue_flush(dev, vq, i)
        vu_queue_notify(dev, vq)
        st = self.stats[qidx]
        st.frames += 1
        st.bytes += size - hdrlen
        if off < size:
            st.dropped += 1  # truncated: the buffers were shorter than the frame
        return True

    def vubr_poll(self, dev: VuDev, recv: Callable[[int], memoryview | None] | None) -> None:
        """One pass of poll mode: each started transmit queue drained, each receive queue
        given what the host side has."""
        for pair in range(self.pairs):
            tx = dev.vq[2 * pair + 1]
            if tx.started and tx.ready and tx.enable:
                self.vubr_handle_tx(dev, 2 * pair + 1)
            if self.held[pair]:
                self.vubr_flush_held(pair)
            elif recv is not None and dev.vq[2 * pair].started:
                self.vubr_backend_recv_cb(pair, recv)

    def summary(self) -> dict:
        out = {"queues": []}
        for pair in range(self.pairs):
            rx, tx = self.stats[2 * pair], self.stats[2 * pair + 1]
            out["queues"].append({"pair": pair, "rx_frames": rx.frames, "rx_bytes": rx.bytes,
                                  "rx_dropped": rx.dropped, "tx_frames": tx.frames,
                                  "tx_bytes": tx.bytes, "tx_dropped": tx.dropped})
        return out


def iov_from_buf(sg: list[memoryview], offset: int, buf: bytes) -> None:
    """Write ``buf`` at ``offset`` across the buffers of ``sg``."""
    pos = 0
    for mv in sg:
        if offset >= len(mv):
            offset -= len(mv)
            continue
        n = min(len(mv) - offset, len(buf) - pos)
        mv[offset : offset + n] = buf[pos : pos + n]
        pos += n
        offset = 0
        if pos == len(buf):
            return


def eventfd_count(fd: int) -> int:
    """What a non-blocking eventfd has counted since last read (0 if nothing)."""
    try:
        return os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        return 0
