"""Stands for drivers/vhost/vhost.c: the vhost core in the kernel (here the worker process
``vhost-<owner pid>`` the KVM process starts, kvmproc/vhost_worker.py).

A ``VhostDev`` belongs to the process that did VHOST_SET_OWNER; its worker (the worker
process's main thread) runs the queued works one after another (``vhost_worker``). A
``VhostPoll`` watches an eventfd (a queue's kick, the KVM ioeventfd's semaphore) or a file
(the tap) and, when it fires, ``vhost_poll_wakeup`` queues its work and wakes the worker.
The rings are read in guest RAM directly, through the memory table QEMU gave
(VHOST_SET_MEM_TABLE): ``vhost_get_vq_desc`` turns a chain into iovecs, checking every
index, length and address the guest wrote (``vq_err`` on a bad one: the queue stops until
the next kick, the process goes on); ``vhost_add_used_n`` and ``vhost_signal`` complete
them and signal the call eventfd (the irqfd) unless the guest suppressed it.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from common.guest_memory import GuestMemory, GuestMemoryError
from common.notifier import EventNotifier
from common.trace import trace_event, traced
from common.virtio_abi import (
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_RING_F_EVENT_IDX,
)
from common.vring import (
    DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VRING_USED_F_NO_NOTIFY,
    VringAddrs,
    VringViews,
    vring_need_event,
)

E2BIG = 7
EFAULT = 14
EINVAL = 22
ENOBUFS = 105
POLL_TICK_S = 0.25
FLUSH_WAIT_S = 2.0
UIO_MAXIOV = 1024

trace_vhost_poll_wakeup = trace_event("vhost_poll_wakeup")
trace_vhost_signal = trace_event("vhost_signal")
_desc_unpack_from = DESC.unpack_from


class VhostWork:
    __slots__ = ("fn", "queued", "name")

    def __init__(self, fn: Callable[[VhostWork], None], name: str) -> None:
        self.fn = fn
        self.queued = False
        self.name = name


class VhostPoll:
    """struct vhost_poll: a wait-queue entry on an eventfd or a file, and the work it queues.

    An eventfd (a named semaphore here) is watched by a waiter thread; a file (the tap) is
    in the worker's own poll() set, with ``mask`` the events that matter (POLLIN, POLLOUT).
    """

    def __init__(self, dev: VhostDev, fn: Callable[[VhostWork], None], mask: int,
                 name: str) -> None:
        self.dev = dev
        self.work = VhostWork(fn, name)
        self.mask = mask
        self.fd = -1
        self.notifier: EventNotifier | None = None
        self._waiter: threading.Thread | None = None
        self.wakeups = 0

    def vhost_poll_start(self, fd: int = -1, notifier: EventNotifier | None = None) -> None:
        """Watch the eventfd (this queue's poll thread takes each kick posted on it and runs
        ``vhost_poll_wakeup``) or the file; a file already ready (vfs_poll) wakes the poll at
        once."""
        if notifier is not None:
            self.notifier = notifier
            self._waiter = threading.Thread(target=self._wait, args=(notifier,),
                                            name=f"vhost-poll:{notifier.name}", daemon=True)
            self._waiter.start()
        else:
            self.fd = fd
            self.dev.worker_poll_changed()
            p = select.poll()
            p.register(fd, self.mask)
            if p.poll(0):
                self.vhost_poll_wakeup()

    def vhost_poll_stop(self) -> None:
        if self.notifier is not None:
            self.notifier = None  # the waiter sees it and leaves, handing a late signal back
        if self.fd >= 0:
            self.fd = -1
            self.dev.worker_poll_changed()

    def _wait(self, notifier: EventNotifier) -> None:
        while self.notifier is notifier:
            if not notifier.wait(POLL_TICK_S):
                continue
            if self.notifier is not notifier:
                notifier.set()  # not ours any more: leave the kick to the next owner
                break
            self.vhost_poll_wakeup()
        notifier.close()

    def vhost_poll_wakeup(self) -> None:
        """The eventfd was signalled (or the file became ready): queue the work."""
        self.wakeups += 1
        if trace_vhost_poll_wakeup.on:
            trace_vhost_poll_wakeup(work=self.work.name)
        self.dev.vhost_work_queue(self.work)

    def vhost_poll_queue(self) -> None:
        self.dev.vhost_work_queue(self.work)


class VhostVirtqueue:
    """struct vhost_virtqueue: a ring in guest RAM as vhost sees it."""

    def __init__(self, dev: VhostDev, index: int,
                 handle_kick: Callable[[VhostWork], None]) -> None:
        self.dev = dev
        self.index = index
        self.num = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.views: VringViews | None = None
        self.last_avail_idx = 0
        self.avail_idx = 0
        self.last_used_idx = 0
        self.used_flags = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.poll = VhostPoll(dev, handle_kick, select.POLLIN, f"handle_kick:{index}")
        self.kick: EventNotifier | None = None
        self.call_ctx: EventNotifier | None = None
        self.error_ctx: EventNotifier | None = None
        self.private_data: Any = None  # the backend (the tap's fd)
        self.busyloop_timeout = 0  # microseconds
        self.heads: list[tuple[int, int]] = []
        self.error: str | None = None
        self.stats = {"descs": 0, "signals": 0, "signals_suppressed": 0,
                      "errors": 0, "busypoll_hits": 0, "busypolls": 0}

    def vq_err(self, message: str) -> int:
        """A guest mistake (vhost.h's vq_err): counted and kept for ``info vhost``, the error
        eventfd QEMU gave (VHOST_SET_VRING_ERR) signalled; the queue stops here."""
        self.error = message
        self.stats["errors"] += 1
        if self.error_ctx is not None:
            self.error_ctx.set()
        return -EINVAL

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "num": self.num, "last_avail_idx": self.last_avail_idx,
                "avail_idx": self.avail_idx, "last_used_idx": self.last_used_idx,
                "kick": self.kick.name if self.kick else None,
                "call": self.call_ctx.name if self.call_ctx else None,
                "backend": self.private_data, "busyloop_timeout_us": self.busyloop_timeout,
                "notify": not self.used_flags & VRING_USED_F_NO_NOTIFY,
                "kicks": self.poll.wakeups, "last_error": self.error, **self.stats}


class VhostDev:
    """struct vhost_dev: the owner, the memory table, the virtqueues and the worker."""

    def __init__(self, nvqs: int, handle_kicks: list[Callable[[VhostWork], None]]) -> None:
        self.vqs = [VhostVirtqueue(self, i, fn) for i, fn in enumerate(handle_kicks[:nvqs])]
        self.owner = 0
        self.mm: GuestMemory | None = None
        self.acked_features = 0
        self.work_list: deque[VhostWork] = deque()
        self.file_polls: list[VhostPoll] = []
        self.worker: threading.Thread | None = None
        self.worker_done = threading.Event()
        self.wake_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.stopping = False
        self.polls_changed = True
        self.works_run = 0
        self.lock = threading.Lock()  # the vq mutexes: ioctls vs. the worker

    # -- the worker ---------------------------------------------------------------------------

    def vhost_dev_set_owner(self, pid: int) -> int:
        """The owner is ``pid`` (QEMU); the calling thread, the main thread of the process
        ``vhost-<pid>`` (kvmproc/vhost_worker.py), is the worker that runs
        ``vhost_worker``."""
        if self.owner:
            return -16  # -EBUSY
        self.owner = pid
        self.worker = threading.current_thread()
        return 0

    def vhost_work_queue(self, work: VhostWork) -> None:
        if not work.queued:
            work.queued = True
            self.work_list.append(work)
            os.eventfd_write(self.wake_efd, 1)

    def vhost_has_work(self) -> bool:
        return bool(self.work_list)

    def worker_poll_changed(self) -> None:
        """A file poll started or stopped: the worker rebuilds its poll set."""
        self.polls_changed = True
        os.eventfd_write(self.wake_efd, 1)

    def vhost_worker(self) -> None:
        """Run queued works; sleep in poll() on the wake eventfd and the files being watched,
        until the device is cleaned up."""
        try:
            self._vhost_worker_loop()
        finally:
            self.worker_done.set()

    def _vhost_worker_loop(self) -> None:
        work_list = self.work_list
        efd = self.wake_efd
        p = select.poll()
        polls: dict[int, list[VhostPoll]] = {}
        while not self.stopping:
            if self.polls_changed:  # the poll set is rebuilt only when a file poll changed
                self.polls_changed = False
                p = select.poll()
                p.register(efd, select.POLLIN)
                polls = {}
                masks: dict[int, int] = {}
                for vp in self.file_polls:
                    if vp.fd >= 0:
                        polls.setdefault(vp.fd, []).append(vp)
                        masks[vp.fd] = masks.get(vp.fd, 0) | vp.mask
                for fd, mask in masks.items():
                    p.register(fd, mask)
            for fd, ev in p.poll(None if not work_list else 0):
                if fd == efd:
                    try:
                        os.eventfd_read(efd)
                    except BlockingIOError:
                        pass
                    continue
                for vp in polls.get(fd, ()):
                    if ev & (vp.mask | select.POLLERR | select.POLLHUP):
                        vp.fd = -1  # one-shot until the handler starts it again
                        self.polls_changed = True
                        vp.vhost_poll_wakeup()
            while work_list and not self.stopping:
                work = work_list.popleft()
                work.queued = False
                with self.lock:
                    work.fn(work)
                self.works_run += 1

    def vhost_dev_flush(self) -> None:
        """Wait until the works queued so far have run (the worker is past them)."""
        if self.worker is None or self.worker is threading.current_thread() \
                or self.worker_done.is_set():
            return
        done = threading.Event()
        flush = VhostWork(lambda _w: done.set(), "flush")
        self.vhost_work_queue(flush)
        done.wait(FLUSH_WAIT_S)

    def vhost_dev_stop(self) -> None:
        """Stop watching the kicks and let the queued works finish."""
        for vq in self.vqs:
            vq.poll.vhost_poll_stop()
        self.vhost_dev_flush()

    def vhost_dev_cleanup(self) -> None:
        """The owner's file went away: drop the eventfds, stop the worker, unmap guest RAM."""
        self.stopping = True
        os.eventfd_write(self.wake_efd, 1)
        if self.worker is not None and self.worker is not threading.current_thread():
            self.worker_done.wait(FLUSH_WAIT_S)
        for vq in self.vqs:
            if vq.views is not None:
                vq.views.release()
                vq.views = None
            for ctx in (vq.call_ctx, vq.error_ctx):
                if ctx is not None:
                    ctx.close()
            vq.call_ctx = vq.error_ctx = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        os.close(self.wake_efd)

    # -- memory and ring setup ----------------------------------------------------------------

    def vhost_set_memory(self, regions: list[dict], allowed: set[str]) -> int:
        """VHOST_SET_MEM_TABLE: the one region is guest RAM, the shared segment QEMU maps."""
        if len(regions) != 1 or regions[0].get("guest_phys_addr") != 0 \
                or regions[0].get("shm") not in allowed:
            return -EINVAL
        mm = GuestMemory(regions[0]["shm"])
        if regions[0].get("memory_size") != mm.size:
            mm.close()
            return -EINVAL
        if self.mm is not None:
            self.mm.close()
        self.mm = mm
        return 0

    def vq_access_ok(self, vq: VhostVirtqueue) -> bool:
        """vq_access_ok: the three parts of the ring lie in guest RAM; map them."""
        if self.mm is None or not vq.num:
            return False
        addrs = VringAddrs(vq.num, vq.desc_addr, vq.avail_addr, vq.used_addr)
        try:
            for _, start, length in addrs.parts():
                self.mm.check(start, length)
        except GuestMemoryError:
            return False
        if vq.views is not None:
            vq.views.release()
        vq.views = VringViews(self.mm.address_space_map(0, self.mm.size), addrs)
        return True

    def vhost_has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)


# -- the ring ------------------------------------------------------------------------------------


def translate_desc(dev: VhostDev, addr: int, length: int) -> memoryview | None:
    """A guest buffer as a view of guest RAM (the iotlb / memory-table lookup); None if any
    byte of it falls outside."""
    mm = dev.mm
    if mm is None or addr < 0 or length < 0 or addr + length > mm.size:
        return None
    return mm.ram[addr : addr + length]


def translate_desc_iov(dev: VhostDev, addr: int, length: int, iov: list[memoryview],
                       iov_count: int) -> int:
    """translate_desc: append the guest buffer to ``iov`` as a view of guest RAM (none for a
    zero-length one); the number of iovecs added, -EFAULT if any byte of it falls outside
    guest RAM, -ENOBUFS if the chain already holds UIO_MAXIOV iovecs."""
    if not length:
        return 0
    view = translate_desc(dev, addr, length)
    if view is None:
        return -EFAULT
    if iov_count >= UIO_MAXIOV:
        return -ENOBUFS
    iov.append(view)
    return 1


def get_indirect(vq: VhostVirtqueue, out_iov: list[memoryview], in_iov: list[memoryview],
                 ind_addr: int, ind_len: int) -> int:
    """An indirect table, read in order from its start: a descriptor's NEXT flag says only
    whether another follows (its ``next`` field is not used); 0, or a negative error."""
    if ind_len % VRING_DESC_SIZE:
        vq.vq_err(f"Invalid length in indirect descriptor: len 0x{ind_len:x} not multiple "
                  f"of 0x{VRING_DESC_SIZE:x}")
        return -EINVAL
    dev = vq.dev
    table = translate_desc(dev, ind_addr, ind_len)
    if table is None:
        vq.vq_err(f"Translation failure {-EFAULT} in indirect.")
        return -EFAULT
    count = ind_len // VRING_DESC_SIZE
    if count > 0x10000:
        vq.vq_err(f"Indirect buffer length too big: {ind_len}")
        return -E2BIG
    i = found = 0
    while True:
        found += 1
        if found > count:
            vq.vq_err(f"Loop detected: last one at {i} indirect size {count}")
            return -EINVAL
        addr, length, flags, nxt = _desc_unpack_from(table, (found - 1) * VRING_DESC_SIZE)
        if flags & VRING_DESC_F_INDIRECT:
            vq.vq_err(f"Nested indirect descriptor: idx {i}, "
                      f"{ind_addr + i * VRING_DESC_SIZE:x}")
            return -EINVAL
        write = flags & VRING_DESC_F_WRITE
        ret = translate_desc_iov(dev, addr, length, in_iov if write else out_iov,
                                 len(in_iov) + len(out_iov))
        if ret < 0:
            vq.vq_err(f"Translation failure {ret} indirect idx {i}")
            return ret
        if not write and in_iov:
            vq.vq_err(f"Indirect descriptor has out after in: idx {i}")
            return -EINVAL
        if not flags & VRING_DESC_F_NEXT:
            return 0
        i = nxt


@traced
def vhost_get_vq_desc(vq: VhostVirtqueue, out_iov: list[memoryview],
                      in_iov: list[memoryview]) -> int:
    """The next chain the guest made available, as iovecs: its head, ``vq.num`` if there is
    none, or a negative error (vq_err) if the guest broke a rule. An INDIRECT descriptor's
    table is read by ``get_indirect`` (VIRTIO_RING_F_INDIRECT_DESC is not checked, as in
    Linux); a NEXT on it goes on in the main table."""
    views = vq.views
    if views is None:
        return -EFAULT
    last_avail_idx = vq.last_avail_idx
    num = vq.num
    if vq.avail_idx == last_avail_idx:
        vq.avail_idx = views.avail[1]
        if ((vq.avail_idx - last_avail_idx) & 0xFFFF) > num:
            vq.vq_err(f"Guest moved used index from {last_avail_idx} to {vq.avail_idx}")
            return -EFAULT
        if vq.avail_idx == last_avail_idx:
            return num
    head = views.avail[2 + last_avail_idx % num]
    if head >= num:
        return vq.vq_err(f"Guest says index {head} > {num} is available")
    mm = vq.dev.mm
    if mm is None:
        return -EFAULT
    ram, size = mm.ram, mm.size
    out_iov.clear()
    in_iov.clear()
    desc = views.desc
    i = head
    found = iovs = 0
    while True:
        if i >= num:
            return vq.vq_err(f"Desc index is {i} > {num}, head = {head}")
        found += 1
        if found > num:
            return vq.vq_err(f"Loop detected: last one at {i} vq size {num} head {head}")
        addr, length, flags, nxt = _desc_unpack_from(desc, i * VRING_DESC_SIZE)
        if flags & VRING_DESC_F_INDIRECT:
            ret = get_indirect(vq, out_iov, in_iov, addr, length)
            if ret < 0:
                vq.vq_err(f"Failure detected in indirect descriptor at idx {i}")
                return ret
            iovs = len(out_iov) + len(in_iov)
        elif length:  # translate_desc, inline: a zero-length buffer gives no iovec
            if addr + length > size:
                vq.vq_err(f"Translation failure {-EFAULT} descriptor idx {i}")
                return -EFAULT
            if iovs >= UIO_MAXIOV:
                vq.vq_err(f"Translation failure {-ENOBUFS} descriptor idx {i}")
                return -ENOBUFS
            iovs += 1
            if flags & VRING_DESC_F_WRITE:
                in_iov.append(ram[addr : addr + length])
            elif in_iov:
                return vq.vq_err(f"Descriptor has out after in: idx {i}")
            else:
                out_iov.append(ram[addr : addr + length])
        elif not flags & VRING_DESC_F_WRITE and in_iov:
            return vq.vq_err(f"Descriptor has out after in: idx {i}")
        if not flags & VRING_DESC_F_NEXT:
            break
        i = nxt
    vq.last_avail_idx = (last_avail_idx + 1) & 0xFFFF
    vq.stats["descs"] += 1
    return head


def vhost_discard_vq_desc(vq: VhostVirtqueue, n: int) -> None:
    """Give back the last ``n`` chains taken (their packets could not go)."""
    vq.last_avail_idx = (vq.last_avail_idx - n) & 0xFFFF


def __vhost_add_used_n(vq: VhostVirtqueue, ring: memoryview,
                       heads: list[tuple[int, int]]) -> None:
    """Write (id, len) entries from ``last_used_idx`` on (no wrap inside); a used index that
    ran past ``signalled_used`` makes it invalid, so the next signal is not suppressed."""
    start = vq.last_used_idx & (vq.num - 1)
    for k, (head, length) in enumerate(heads):
        slot = (start + k) * 2
        ring[slot] = head
        ring[slot + 1] = length
    old = vq.last_used_idx
    new = vq.last_used_idx = (old + len(heads)) & 0xFFFF
    if ((new - vq.signalled_used) & 0xFFFF) < ((new - old) & 0xFFFF):
        vq.signalled_used_valid = False


@traced
def vhost_add_used_n(vq: VhostVirtqueue, heads: list[tuple[int, int]]) -> int:
    """Write (id, len) of each completed chain to the used ring, then publish the index."""
    views = vq.views
    if views is None:
        return -EFAULT
    ring = views.used_ring
    n = vq.num - (vq.last_used_idx & (vq.num - 1))
    if n < len(heads):
        __vhost_add_used_n(vq, ring, heads[:n])
        heads = heads[n:]
    __vhost_add_used_n(vq, ring, heads)
    # smp_wmb: the entries are visible before the index that covers them
    views.used_hdr[1] = vq.last_used_idx
    return 0


def vhost_notify(dev: VhostDev, vq: VhostVirtqueue) -> bool:
    """Does the guest want an interrupt for what was just used?"""
    views = vq.views
    if views is None:
        return False
    if dev.vhost_has_feature(VIRTIO_F_NOTIFY_ON_EMPTY) and vq.avail_idx == vq.last_avail_idx:
        return True
    if not dev.vhost_has_feature(VIRTIO_RING_F_EVENT_IDX):
        return not views.avail[0] & VRING_AVAIL_F_NO_INTERRUPT
    old = vq.signalled_used
    valid = vq.signalled_used_valid
    new = vq.signalled_used = vq.last_used_idx
    vq.signalled_used_valid = True
    if not valid:
        return True
    return vring_need_event(views.avail[2 + vq.num], new, old)


@traced
def vhost_signal(dev: VhostDev, vq: VhostVirtqueue) -> None:
    """eventfd_signal on the call eventfd: KVM's irqfd injects the queue's interrupt."""
    if vq.call_ctx is not None and vhost_notify(dev, vq):
        vq.stats["signals"] += 1
        if trace_vhost_signal.on:
            trace_vhost_signal(vq=vq.index, used_idx=vq.last_used_idx)
        vq.call_ctx.set()
    else:
        vq.stats["signals_suppressed"] += 1


def vhost_add_used_and_signal_n(dev: VhostDev, vq: VhostVirtqueue,
                                heads: list[tuple[int, int]]) -> None:
    vhost_add_used_n(vq, heads)
    vhost_signal(dev, vq)


def vhost_update_used_flags(vq: VhostVirtqueue) -> None:
    if vq.views is not None:
        vq.views.used_hdr[0] = vq.used_flags


def vhost_vq_init_access(vq: VhostVirtqueue) -> int:
    """A backend was set: write the used flags, forget the last signal, and take
    ``last_used_idx`` from the used ring."""
    if vq.private_data is None or vq.views is None:
        return 0
    vhost_update_used_flags(vq)
    vq.signalled_used_valid = False
    vq.last_used_idx = vq.views.used_hdr[1]
    return 0


def vhost_disable_notify(dev: VhostDev, vq: VhostVirtqueue) -> None:
    """No kicks wanted while the worker is on the ring (with EVENT_IDX the guest stops
    kicking by itself once it passes avail_event)."""
    if vq.used_flags & VRING_USED_F_NO_NOTIFY:
        return
    vq.used_flags |= VRING_USED_F_NO_NOTIFY
    if not dev.vhost_has_feature(VIRTIO_RING_F_EVENT_IDX):
        vhost_update_used_flags(vq)


def vhost_enable_notify(dev: VhostDev, vq: VhostVirtqueue) -> bool:
    """Kicks wanted again; True if the guest added buffers meanwhile (look once more)."""
    if not vq.used_flags & VRING_USED_F_NO_NOTIFY:
        return False
    vq.used_flags &= ~VRING_USED_F_NO_NOTIFY
    views = vq.views
    if views is None:
        return False
    if not dev.vhost_has_feature(VIRTIO_RING_F_EVENT_IDX):
        vhost_update_used_flags(vq)
    else:
        views.avail_event_h[0] = vq.avail_idx  # vhost_update_avail_event
    # smp_mb: the flag (or event) is visible before the index is read again
    return views.avail[1] != vq.avail_idx


def vhost_vq_avail_empty(dev: VhostDev, vq: VhostVirtqueue) -> bool:
    if vq.avail_idx != vq.last_avail_idx:
        return False
    if vq.views is None:
        return True
    vq.avail_idx = vq.views.avail[1]
    return vq.avail_idx == vq.last_avail_idx
