"""What the benchmark measures the replica against, and its microbenchmarks.

* Two-process transports (``run_transport``): the replica's own split vring (the guest
  driver's ``virtio_ring`` code in one process, QEMU's ``virtio`` device code in the other,
  on one ``GuestMemory`` segment), a bare single-producer/single-consumer ring in shared
  memory, a POSIX message queue and a ``multiprocessing.Queue``. Shared-memory transports
  poll (each process spins on the other's index); the queues block, as they are built to.
* ``mpqueue_sendto``: the end-to-end baseline, frames through a ``multiprocessing.Queue`` to
  a process that ``sendto()``s their payloads to a host UDP socket.
* ``sem_pingpong``: the round trip of a semaphore pair between two processes.
* ``flush_trace_cost``: virtio-net's TX flush loop as shipped (trace guards in place) against
  a copy of the same modules with every ``if trace_x.on:`` block stripped from the source.
* ``UdpCapture``: a host UDP sink that keeps each datagram and its kernel arrival time.

Every IPC object made here is named ``/vbench.<pid>.*`` (not ``/vnr.``, which the run
cleanup would claim) and is unlinked before the function returns.
"""

from __future__ import annotations

import ast
import gc
import inspect
import itertools
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import threading
import time
import types
from collections.abc import Callable
from contextlib import nullcontext
from multiprocessing.connection import Connection
from typing import Any

import posix_ipc

from common import netns
from common.guest_memory import GuestMemory
from common.inet import ETH_IP_UDP, ETH_P_IP, IPPROTO_UDP, csum_fold, csum_partial, ip_aton
from common.virtio_abi import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_RING_F_EVENT_IDX,
)
from common.vring import VringLayout
from vreplica.run.hostside import SEQ_BYTES, big_receive_buffer
from vreplica.run.hostside import expected_payload as payload

QUEUE = 256
BUF_SIZE = 2048
RING_BASE = 4096  # guest-physical 0 means "no ring" to the legacy device
BUF_BASE = 32768
SHM_SIZE = 1 << 20
TRANSPORTS = ("vring", "bare", "posix_mq", "mp_queue")
TRANSPORT_NAMES = {
    "vring": "virtio split ring (replica driver + device code)",
    "bare": "bare SPSC shared-memory ring",
    "posix_mq": "posix_ipc.MessageQueue",
    "mp_queue": "multiprocessing.Queue",
}
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@qq")
_names = itertools.count()
SPIN_MASK = 63
"""A polling side that found nothing this many times in a row yields its CPU once (the
machine may have fewer free cores than spinning processes)."""
yield_cpu = os.sched_yield


def ipc_name(tag: str) -> str:
    return f"/vbench.{os.getpid()}.{tag}.{next(_names)}"


def _ctx() -> Any:
    return mp.get_context("fork")


def _child(fn: Callable[..., None], *args: Any) -> None:
    """A benchmark process: dies with its parent (it may be spinning on shared memory)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    fn(*args)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


# -- the host sink ------------------------------------------------------------------------------


class UdpCapture:
    """Receives ``expect`` datagrams of ``size`` bytes on 127.0.0.1 and keeps them all.

    Arrival times come from the kernel (SO_TIMESTAMPNS, CLOCK_REALTIME, moved onto
    CLOCK_MONOTONIC), so a sink thread that falls behind does not stretch the window.
    Payloads are checked after the run, not while packets arrive.
    """

    def __init__(self, expect: int, size: int, ns: str | None = None) -> None:
        self.expect = expect
        self.size = size
        with netns.entered(ns) if ns else nullcontext():  # behind a tap: at 10.0.2.2 there
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        big_receive_buffer(self.sock)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.kernel_timestamps = True
        except OSError:
            self.kernel_timestamps = False
        self.sock.bind((netns.HOST_ADDR if ns else "127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.data = bytearray(expect * size)
        self.arrivals: list[int] = []
        self.extra = 0
        self.bad_len = 0
        self.user_stamped = 0
        self.offset_ns = time.time_ns() - time.monotonic_ns()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="bench-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        view = memoryview(self.data)
        scratch = memoryview(bytearray(65536))
        size, expect = self.size, self.expect
        anc = socket.CMSG_SPACE(TIMESPEC.size)
        recv = self.sock.recvmsg_into
        arrivals = self.arrivals
        offset = self.offset_ns
        while not self._stop:
            i = len(arrivals)
            target = view[i * size : (i + 1) * size] if i < expect else scratch
            try:
                nbytes, ancdata, flags, _ = recv([target], anc)
            except TimeoutError:
                continue
            except OSError:
                return
            ts = 0
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = TIMESPEC.unpack_from(cdata)
                    ts = sec * 1_000_000_000 + nsec - offset
            if not ts:
                ts = time.monotonic_ns()
                self.user_stamped += 1
            if i >= expect:
                self.extra += 1
                continue
            if nbytes != size or flags & socket.MSG_TRUNC:
                self.bad_len += 1
            arrivals.append(ts)

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        return len(self.arrivals) >= n

    def close(self) -> None:
        self._stop = True
        self._thread.join(2.0)
        self.sock.close()

    def summary(self) -> dict[str, Any]:
        """Counts, order and payload check, and the arrival window (monotonic ns)."""
        n = len(self.arrivals)
        size = self.size
        data = self.data
        seqs = [int.from_bytes(data[i * size : i * size + SEQ_BYTES], "big") for i in range(n)]
        bad = sum(1 for i, s in enumerate(seqs) if data[i * size : (i + 1) * size]
                  != payload(s, size))
        unique = len(set(seqs))
        return {
            "received": n,
            "unique": unique,
            "duplicates": n - unique,
            "extra": self.extra,
            "bad_payloads": bad + self.bad_len,
            "in_order": all(a < b for a, b in zip(seqs, seqs[1:], strict=False)),
            "complete": n == self.expect and unique == n and seqs == list(range(n)),
            "first_ns": self.arrivals[0] if n else 0,
            "last_ns": self.arrivals[-1] if n else 0,
            "kernel_timestamps": self.kernel_timestamps and not self.user_stamped,
        }


# -- two-process transports ---------------------------------------------------------------------


def _buf_addr(b: int) -> int:
    return BUF_BASE + b * BUF_SIZE


def _vring_producer(shm: str, size: int, n: int, barrier: Any, out: Connection) -> None:
    from guestproc.virtio_ring import (
        virtqueue_add_outbuf,
        virtqueue_get_buf,
        virtqueue_kick_prepare,
        virtqueue_notify,
        vring_create_virtqueue,
    )

    mem = GuestMemory(shm)
    ram = mem.ram
    vq = vring_create_virtqueue(1, QUEUE, RING_BASE, ram, None, lambda q: True, None,
                                "output.0", True)
    free = list(range(QUEUE))
    data = payload(0, size)
    barrier.wait()
    t0 = time.monotonic_ns()
    for _ in range(n):
        while True:  # start_xmit: reclaim what the device used, then add
            r = virtqueue_get_buf(vq)
            if r is None:
                break
            free.append(r[0])
        spins = 0
        while not free:
            r = virtqueue_get_buf(vq)
            if r is not None:
                free.append(r[0])
            else:
                spins += 1
                if not spins & SPIN_MASK:
                    yield_cpu()
        b = free.pop()
        addr = _buf_addr(b)
        ram[addr : addr + size] = data
        virtqueue_add_outbuf(vq, [(addr, size)], b)
        if virtqueue_kick_prepare(vq):
            virtqueue_notify(vq)
    out.send({"t0": t0, "kicks": vq.kicks})


def _null_tx_device(mem: GuestMemory) -> tuple[Any, Any]:
    """A device of one TX queue (EVENT_IDX on) on the ring at RING_BASE, that drops what it
    pops: the device end of the vring transports. Returns the device and its queue."""
    from qemuproc.virtio import (
        VirtIODevice,
        virtio_add_queue,
        virtio_queue_set_addr,
        virtio_set_features,
    )

    vdev = VirtIODevice("bench-null", 1, 0, mem)
    vq = virtio_add_queue(vdev, QUEUE, lambda d, q: None, "TX")
    vdev.host_features = 1 << VIRTIO_RING_F_EVENT_IDX
    virtio_set_features(vdev, vdev.host_features)
    virtio_queue_set_addr(vdev, 0, RING_BASE)
    return vdev, vq


def _vring_consumer(shm: str, size: int, n: int, barrier: Any, out: Connection) -> None:
    from qemuproc.virtio import virtio_notify, virtqueue_pop, virtqueue_push

    vdev, vq = _null_tx_device(GuestMemory(shm))
    got = nbytes = spins = 0
    barrier.wait()
    while got < n:
        elem = virtqueue_pop(vq)
        if elem is None:
            spins += 1
            if not spins & SPIN_MASK:
                yield_cpu()
            continue
        for m in elem.out_sg:
            nbytes += len(bytes(m))  # the null backend reads the payload, then drops it
        virtqueue_push(vq, elem, 0)
        virtio_notify(vdev, vq)
        got += 1
    out.send({"t1": time.monotonic_ns(), "got": got, "bytes": nbytes,
              "interrupts": vq.notifies, "errors": vdev.errors})


_IDX = 8  # the consumer's index lives one cache line after the producer's


def _bare_views(ram: memoryview) -> tuple[memoryview, memoryview]:
    return ram[0:128].cast("Q"), ram[128 : 128 + 4 * QUEUE].cast("I")


def _bare_producer(shm: str, size: int, n: int, barrier: Any, out: Connection) -> None:
    mem = GuestMemory(shm)
    ram = mem.ram
    idx, lens = _bare_views(ram)
    data = payload(0, size)
    mask = QUEUE - 1
    head = spins = 0
    barrier.wait()
    t0 = time.monotonic_ns()
    for _ in range(n):
        while head - idx[_IDX] >= QUEUE:
            spins += 1
            if not spins & SPIN_MASK:
                yield_cpu()
        s = head & mask
        off = _buf_addr(s)
        ram[off : off + size] = data
        lens[s] = size
        head += 1
        idx[0] = head
    out.send({"t0": t0})


def _bare_consumer(shm: str, size: int, n: int, barrier: Any, out: Connection) -> None:
    mem = GuestMemory(shm)
    ram = mem.ram
    idx, lens = _bare_views(ram)
    mask = QUEUE - 1
    tail = nbytes = spins = 0
    barrier.wait()
    while tail < n:
        if idx[0] == tail:
            spins += 1
            if not spins & SPIN_MASK:
                yield_cpu()
            continue
        s = tail & mask
        off = _buf_addr(s)
        nbytes += len(bytes(ram[off : off + lens[s]]))
        tail += 1
        idx[_IDX] = tail
    out.send({"t1": time.monotonic_ns(), "got": tail, "bytes": nbytes})


def _mq_producer(name: str, size: int, n: int, barrier: Any, out: Connection) -> None:
    mq = posix_ipc.MessageQueue(name)
    data = payload(0, size)
    send = mq.send
    barrier.wait()
    t0 = time.monotonic_ns()
    for _ in range(n):
        send(data)
    out.send({"t0": t0})
    mq.close()


def _mq_consumer(name: str, size: int, n: int, barrier: Any, out: Connection) -> None:
    mq = posix_ipc.MessageQueue(name)
    receive = mq.receive
    nbytes = 0
    barrier.wait()
    for _ in range(n):
        nbytes += len(receive()[0])
    out.send({"t1": time.monotonic_ns(), "got": n, "bytes": nbytes})
    mq.close()


def _mpq_producer(q: Any, size: int, n: int, barrier: Any, out: Connection) -> None:
    data = payload(0, size)
    put = q.put
    barrier.wait()
    t0 = time.monotonic_ns()
    for _ in range(n):
        put(data)
    out.send({"t0": t0})
    q.close()
    q.join_thread()


def _mpq_consumer(q: Any, size: int, n: int, barrier: Any, out: Connection) -> None:
    get = q.get
    nbytes = 0
    barrier.wait()
    for _ in range(n):
        nbytes += len(get())
    out.send({"t1": time.monotonic_ns(), "got": n, "bytes": nbytes})


def _reap(procs: list[Any], pipes: tuple[Connection, ...]) -> None:
    """Wait for benchmark processes (terminating one that hangs), then close their pipes."""
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.terminate()
            p.join(1.0)
    for c in pipes:
        c.close()


def _run_pair(producer: Callable[..., None], consumer: Callable[..., None], handle: Any,
              size: int, n: int, timeout: float,
              on_ready: Callable[[], None] | None = None) -> tuple[dict, dict]:
    """Start both ends, release them together, and collect what each reports.

    ``on_ready`` runs once both ends have opened what they share (to unlink it early).
    """
    ctx = _ctx()
    barrier = ctx.Barrier(3)
    p_in, p_out = ctx.Pipe(False)
    c_in, c_out = ctx.Pipe(False)
    procs = [ctx.Process(target=_child, args=(consumer, handle, size, n, barrier, c_out),
                         daemon=True),
             ctx.Process(target=_child, args=(producer, handle, size, n, barrier, p_out),
                         daemon=True)]
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout)
        if on_ready is not None:
            on_ready()
        if not (p_in.poll(timeout) and c_in.poll(timeout)):
            raise TimeoutError(f"{producer.__name__}/{consumer.__name__}: no result "
                               f"in {timeout:g} s")
        return p_in.recv(), c_in.recv()
    finally:
        _reap(procs, (p_in, p_out, c_in, c_out))


def _make_mq(name: str, size: int) -> posix_ipc.MessageQueue:
    for depth in (QUEUE, posix_ipc.QUEUE_MESSAGES_MAX_DEFAULT):
        try:
            return posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_messages=depth,
                                          max_message_size=max(size, 64))
        except (ValueError, OSError, posix_ipc.Error):
            continue
    raise RuntimeError("cannot create a POSIX message queue")


def run_transport(transport: str, size: int, n: int, timeout: float = 60.0) -> dict[str, Any]:
    """``n`` payloads of ``size`` bytes from one process to another over ``transport``."""
    extra: dict[str, Any] = {}
    if transport in ("vring", "bare"):
        name = ipc_name("ring")
        GuestMemory(name, SHM_SIZE, create=True).close()
        assert VringLayout(QUEUE, RING_BASE).end <= BUF_BASE
        try:
            unlink = lambda: GuestMemory.unlink(name)  # noqa: E731
            if transport == "vring":
                prod, cons = _run_pair(_vring_producer, _vring_consumer, name, size, n, timeout,
                                       unlink)
                extra = {"kicks": prod["kicks"], "interrupts": cons["interrupts"],
                         "device_errors": cons["errors"]}
            else:
                prod, cons = _run_pair(_bare_producer, _bare_consumer, name, size, n, timeout,
                                       unlink)
        finally:
            GuestMemory.unlink(name)
    elif transport == "posix_mq":
        name = ipc_name("mq")
        mq = _make_mq(name, size)
        extra = {"queue_depth": mq.max_messages}
        try:
            prod, cons = _run_pair(_mq_producer, _mq_consumer, name, size, n, timeout,
                                   lambda: posix_ipc.unlink_message_queue(name))
        finally:
            mq.close()
            try:
                posix_ipc.unlink_message_queue(name)
            except posix_ipc.ExistentialError:
                pass
    elif transport == "mp_queue":
        q = _ctx().Queue(QUEUE)
        try:
            prod, cons = _run_pair(_mpq_producer, _mpq_consumer, q, size, n, timeout)
        finally:
            q.close()
            q.join_thread()
    else:
        raise ValueError(f"unknown transport {transport!r}")
    seconds = (cons["t1"] - prod["t0"]) / 1e9
    ok = cons["got"] == n and cons["bytes"] == n * size
    return {"transport": transport, "size": size, "packets": n, "seconds": seconds,
            "pps": n / seconds if seconds > 0 else None, "complete": ok, **extra}


def ring_side_costs(size: int, rounds: int) -> dict[str, float]:
    """Each side's CPU cost per packet, vring and bare ring, alternately in one process.

    The same per-packet work as the two-process loops (payload in, index published; pop,
    copy out, push, notify; reclaim), a ring's worth at a time, so no scheduler, cache-line
    transfer or spinning is in it: what the code costs, whatever else runs on the machine.
    """
    from guestproc.virtio_ring import (
        virtqueue_add_outbuf,
        virtqueue_get_buf,
        virtqueue_kick_prepare,
        virtqueue_notify,
        vring_create_virtqueue,
    )
    from qemuproc.virtio import virtio_notify, virtqueue_pop, virtqueue_push

    name = ipc_name("side")
    mem = GuestMemory(name, SHM_SIZE, create=True)
    GuestMemory.unlink(name)
    ram = mem.ram
    vq = vring_create_virtqueue(1, QUEUE, RING_BASE, ram, None, lambda q: True, None,
                                "output.0", True)
    vdev, dq = _null_tx_device(mem)
    bname = ipc_name("side")
    bmem = GuestMemory(bname, SHM_SIZE, create=True)
    GuestMemory.unlink(bname)
    bram = bmem.ram
    idx, lens = _bare_views(bram)
    data = payload(0, size)
    free = list(range(QUEUE))
    mask = QUEUE - 1
    head = tail = 0
    out: dict[str, list[int]] = {"vring_driver": [], "vring_device": [], "bare_producer": [],
                                 "bare_consumer": []}
    now = time.perf_counter_ns
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            t0 = now()
            for _ in range(QUEUE):
                b = free.pop()
                addr = _buf_addr(b)
                ram[addr : addr + size] = data
                virtqueue_add_outbuf(vq, [(addr, size)], b)
                if virtqueue_kick_prepare(vq):
                    virtqueue_notify(vq)
            t1 = now()
            while True:
                elem = virtqueue_pop(dq)
                if elem is None:
                    break
                for m in elem.out_sg:
                    len(bytes(m))
                virtqueue_push(dq, elem, 0)
                virtio_notify(vdev, dq)
            t2 = now()
            while True:
                r = virtqueue_get_buf(vq)
                if r is None:
                    break
                free.append(r[0])
            t3 = now()
            for _ in range(QUEUE):
                s = head & mask
                off = _buf_addr(s)
                bram[off : off + size] = data
                lens[s] = size
                head += 1
                idx[0] = head
            t4 = now()
            while idx[0] != tail:
                s = tail & mask
                off = _buf_addr(s)
                len(bytes(bram[off : off + lens[s]]))
                tail += 1
                idx[_IDX] = tail
            t5 = now()
            if len(free) != QUEUE or tail != head:
                raise RuntimeError("ring_side_costs: a round did not complete")
            out["vring_driver"].append(t1 - t0 + t3 - t2)
            out["vring_device"].append(t2 - t1)
            out["bare_producer"].append(t4 - t3)
            out["bare_consumer"].append(t5 - t4)
    finally:
        if gc_was:
            gc.enable()
        mem.close()
        bmem.close()
    return {f"{k}_ns": statistics.median(v) / QUEUE for k, v in out.items()}


# -- the end-to-end baseline: multiprocessing.Queue, then sendto() -------------------------------

GUEST_MAC = bytes.fromhex("525400123456")
GATEWAY_MAC = bytes.fromhex("52550a000202")


def build_frame(seq: int, data: bytes, sport: int, dport: int) -> bytes:
    """The Ethernet frame the guest's stack makes for datagram ``seq`` (IPv4, UDP)."""
    src, dst = ip_aton("10.0.2.15"), ip_aton("10.0.2.2")
    udp_len = 8 + len(data)
    tot_len = 20 + udp_len
    ip_id = (seq + 1) & 0xFFFF
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, tot_len, ip_id, 0x4000, 64, IPPROTO_UDP, 0,
                      src, dst)
    ip_csum = csum_fold(csum_partial(hdr))
    acc = (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + IPPROTO_UDP + udp_len
           + sport + dport + udp_len)
    udp_csum = csum_fold(csum_partial(data, acc))
    return ETH_IP_UDP.pack(GATEWAY_MAC, GUEST_MAC, ETH_P_IP, 0x45, 0, tot_len, ip_id, 0x4000,
                           64, IPPROTO_UDP, ip_csum, src, dst, sport, dport, udp_len,
                           udp_csum) + data


def _frames_producer(q: Any, size: int, n: int, barrier: Any, out: Connection) -> None:
    sport, dport = q.ports
    datas = [payload(i, size) for i in range(n)]  # made before the clock, as the guest does
    put = q.put
    barrier.wait()
    t0 = time.monotonic_ns()
    for seq in range(n):
        put(build_frame(seq, datas[seq], sport, dport))
    out.send({"t0": t0})
    q.close()
    q.join_thread()


def _frames_sender(q: Any, size: int, n: int, barrier: Any, out: Connection) -> None:
    _, dport = q.ports
    get = q.get
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sendto = s.sendto
    addr = ("127.0.0.1", dport)
    barrier.wait()
    for _ in range(n):
        sendto(get()[42:], addr)
    out.send({"t1": time.monotonic_ns(), "got": n, "bytes": n * size})
    s.close()


class _PortedQueue:
    """A multiprocessing.Queue that also carries the flow's ports to both ends."""

    def __init__(self, q: Any, ports: tuple[int, int]) -> None:
        self.q = q
        self.ports = ports
        self.put = q.put
        self.get = q.get

    def close(self) -> None:
        self.q.close()

    def join_thread(self) -> None:
        self.q.join_thread()


def mpqueue_sendto(size: int, n: int, timeout: float = 60.0) -> dict[str, Any]:
    """The same frames as the guest's, through a multiprocessing.Queue to a sendto() process."""
    cap = UdpCapture(n, size)
    q = _PortedQueue(_ctx().Queue(QUEUE), (32768, cap.port))
    try:
        prod, _ = _run_pair(_frames_producer, _frames_sender, q, size, n, timeout)
        cap.wait_for(n, 5.0)
    finally:
        q.close()
        q.join_thread()
        cap.close()
    sink = cap.summary()
    return {"size": size, "packets": n, "first_send_ns": prod["t0"], "sink": sink,
            **e2e_rates(sink, prod["t0"])}


def _sendto_alone(port: int, size: int, n: int, barrier: Any, out: Connection) -> None:
    datas = [payload(i, size) for i in range(n)]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sendto = s.sendto
    addr = ("127.0.0.1", port)
    barrier.wait()
    t0 = time.monotonic_ns()
    for d in datas:
        sendto(d, addr)
    out.send({"t0": t0})
    s.close()


def sendto_ceiling(size: int, n: int, timeout: float = 60.0) -> dict[str, Any]:
    """One process doing nothing but one sendto() per datagram (payloads made before the
    clock) to the same kind of sink: the most any path that sends each datagram on its own,
    as libslirp's sosendto does, can deliver from one Python process."""
    cap = UdpCapture(n, size)
    ctx = _ctx()
    barrier = ctx.Barrier(2)
    r_in, r_out = ctx.Pipe(False)
    proc = ctx.Process(target=_child, args=(_sendto_alone, cap.port, size, n, barrier, r_out),
                       daemon=True)
    proc.start()
    try:
        barrier.wait(timeout)
        if not r_in.poll(timeout):
            raise TimeoutError("sendto alone: no result")
        t0 = r_in.recv()["t0"]
        cap.wait_for(n, 5.0)
    finally:
        _reap([proc], (r_in, r_out))
        cap.close()
    sink = cap.summary()
    return {"size": size, "packets": n, "first_send_ns": t0, "sink": sink,
            **e2e_rates(sink, t0)}


def e2e_rates(sink: dict[str, Any], first_send_ns: int | None) -> dict[str, Any]:
    """Delivered packets over (last arrival - first send), and over the arrival window."""
    n = sink["received"]
    out: dict[str, Any] = {"delivered": n}
    span = sink["last_ns"] - sink["first_ns"]
    out["pps_arrival_window"] = (n - 1) / (span / 1e9) if n > 1 and span > 0 else None
    if first_send_ns:
        total = sink["last_ns"] - first_send_ns
        out["pps_send_to_last_arrival"] = n / (total / 1e9) if total > 0 else None
    return out


# -- semaphore ping-pong ------------------------------------------------------------------------


def _pinger(names: tuple[str, str], rounds: int, warmup: int, pace_s: float, barrier: Any,
            out: Connection, cpu: int | None = None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ping, pong = (posix_ipc.Semaphore(x) for x in names)
    now = time.monotonic_ns
    samples = []
    barrier.wait()
    for i in range(warmup + rounds):
        if pace_s:
            time.sleep(pace_s)
        t = now()
        ping.release()
        pong.acquire()
        if i >= warmup:
            samples.append(now() - t)
    out.send(samples)


def _ponger(names: tuple[str, str], rounds: int, warmup: int, pace_s: float, barrier: Any,
            out: Connection, cpu: int | None = None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ping, pong = (posix_ipc.Semaphore(x) for x in names)
    barrier.wait()
    for _ in range(warmup + rounds):
        ping.acquire()
        pong.release()
    out.send(None)


def _unlink_sems(names: tuple[str, ...]) -> None:
    for x in names:
        try:
            posix_ipc.unlink_semaphore(x)
        except posix_ipc.ExistentialError:
            pass


def sem_pingpong(rounds: int, warmup: int = 100, pace_s: float = 0.0,
                 timeout: float = 60.0, cpus: tuple[int, int] | None = None) -> dict[str, Any]:
    """Round trips of a posix_ipc.Semaphore pair between two processes (blocking waits).

    With ``pace_s`` the pinger sleeps that long before each round, so every round trip
    starts from two idle processes, as a paced kick does. With ``cpus`` the pinger and the
    ponger are pinned to those two CPUs, so each post wakes a process on the other CPU
    (left alone, the scheduler usually puts two such processes on one CPU).
    """
    pin = cpus or (None, None)
    names = (ipc_name("ping"), ipc_name("pong"))
    sems = [posix_ipc.Semaphore(x, posix_ipc.O_CREX, mode=0o600, initial_value=0)
            for x in names]
    ctx = _ctx()
    barrier = ctx.Barrier(3)
    a_in, a_out = ctx.Pipe(False)
    b_in, b_out = ctx.Pipe(False)
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(_ponger, names, rounds, warmup, pace_s, barrier, b_out,
                               pin[1])),
             ctx.Process(target=_child, daemon=True,
                         args=(_pinger, names, rounds, warmup, pace_s, barrier, a_out,
                               pin[0]))]
    try:
        for p in procs:
            p.start()
        barrier.wait(timeout)
        _unlink_sems(names)
        if not a_in.poll(timeout + (warmup + rounds) * pace_s):
            raise TimeoutError("semaphore ping-pong: no result")
        samples = [s / 1000 for s in a_in.recv()]
    finally:
        _reap(procs, (a_in, a_out, b_in, b_out))
        _unlink_sems(names)
        for s in sems:
            s.close()
    return {"rounds": rounds, "pace_ms": pace_s * 1000, "cpus": list(cpus) if cpus else None,
            "rtt_us_p50": percentile(samples, 50),
            "rtt_us_p99": percentile(samples, 99), "rtt_us_min": min(samples)}


# -- the cost of trace points that are off ------------------------------------------------------

STRIP_MODULES = ("qemuproc.net", "qemuproc.virtio", "qemuproc.virtio_net")


class _StripTrace(ast.NodeTransformer):
    """Drops every ``if trace_x.on: ...`` block (no else) and every ``@traced``."""

    def __init__(self) -> None:
        self.guards = 0
        self.decorators = 0

    def visit_If(self, node: ast.If) -> ast.AST | None:
        self.generic_visit(node)
        t = node.test
        if (isinstance(t, ast.Attribute) and t.attr == "on" and isinstance(t.value, ast.Name)
                and t.value.id.startswith("trace_") and not node.orelse):
            self.guards += 1
            return None
        return node

    def _undecorate(self, node: ast.FunctionDef) -> ast.FunctionDef:
        self.generic_visit(node)
        keep = [d for d in node.decorator_list
                if not (isinstance(d, ast.Name) and d.id == "traced")]
        self.decorators += len(node.decorator_list) - len(keep)
        node.decorator_list = keep
        return node

    visit_FunctionDef = _undecorate

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for attr in ("body", "orelse", "finalbody"):
            block = getattr(node, attr, None)
            if attr == "body" and isinstance(block, list) and not block:
                setattr(node, attr, [ast.Pass()])
        return node


def strip_trace_modules(strip: bool = True) -> tuple[dict[str, types.ModuleType], int]:
    """Copies of STRIP_MODULES compiled from their source with the trace guards removed
    (with ``strip`` False: compiled the same way with nothing removed, the control).

    Each copy imports the other copies (they sit in sys.modules while they are executed),
    so the whole TX path runs trace-free. Returns the modules and the guards removed.
    """
    import importlib

    originals = {m: importlib.import_module(m) for m in STRIP_MODULES}
    copies: dict[str, types.ModuleType] = {}
    removed = 0
    try:
        for name in STRIP_MODULES:
            src = inspect.getsource(originals[name])
            tree = ast.parse(src)
            if strip:
                stripper = _StripTrace()
                tree = ast.fix_missing_locations(stripper.visit(tree))
                removed += stripper.guards
            mod = types.ModuleType(name)
            mod.__file__ = originals[name].__file__
            sys.modules[name] = mod
            exec(compile(tree, f"<no-trace {name}>", "exec"), mod.__dict__)  # noqa: S102
            copies[name] = mod
    finally:
        sys.modules.update(originals)
    return copies, removed


def _null_receive(nc: Any, buf: Any) -> int:
    return len(bytes(buf))


class _FlushRig:
    """A virtio-net device (one module set) and a guest TX ring on its own guest memory."""

    HDR = 10

    def __init__(self, mods: dict[str, types.ModuleType], mem: GuestMemory, base: int,
                 size: int) -> None:
        from guestproc.virtio_ring import vring_create_virtqueue
        from qemuproc.main_loop import MainLoop

        vio, net, vnet = (mods[m] for m in ("qemuproc.virtio", "qemuproc.net",
                                            "qemuproc.virtio_net"))
        self.flush_tx = vnet.virtio_net_flush_tx
        self.ring_len = QUEUE
        self.gvq = vring_create_virtqueue(1, QUEUE, base, mem.ram, None, lambda q: True, None,
                                          "output.0", True)
        self.main_loop = MainLoop()
        self.n = n = vnet.VirtIONet(mem, self.main_loop, queue_size=QUEUE)
        netdev = net.qemu_new_net_client(net.NetClientInfo("null", _null_receive), None,
                                         "null", "null0")
        vnet.virtio_net_device_init(n, netdev)
        vio.virtio_set_features(n, n.host_features & ((1 << VIRTIO_RING_F_EVENT_IDX)
                                                     | (1 << VIRTIO_F_ANY_LAYOUT)))
        vio.virtio_queue_set_addr(n, 1, base)
        vio.virtio_set_status(n, VIRTIO_CONFIG_S_DRIVER_OK)
        self.q = n.vqs[0]
        self.bufs = []
        layout_end = VringLayout(QUEUE, base).end
        first = (layout_end + BUF_SIZE - 1) // BUF_SIZE * BUF_SIZE
        frame = bytes(self.HDR) + payload(0, size)
        for i in range(QUEUE):
            addr = first + i * BUF_SIZE
            mem.ram[addr : addr + len(frame)] = frame
            self.bufs.append((addr, len(frame)))
        self.end = first + QUEUE * BUF_SIZE

    def round(self) -> int:
        """Queue a full ring, time one flush of it, reclaim; returns the flush's ns."""
        from guestproc.virtio_ring import virtqueue_add_outbuf, virtqueue_get_buf

        gvq = self.gvq
        for i, sg in enumerate(self.bufs):
            virtqueue_add_outbuf(gvq, [sg], i)
        t = time.perf_counter_ns()
        sent = self.flush_tx(self.q)
        dt = time.perf_counter_ns() - t
        if sent != QUEUE:
            raise RuntimeError(f"flush sent {sent} of {QUEUE}")
        while virtqueue_get_buf(gvq) is not None:
            pass
        return dt


def flush_trace_cost(rounds: int, size: int) -> dict[str, Any]:
    """virtio_net_flush_tx per packet, trace guards as shipped vs. source-stripped copies.

    Three module sets run here, round by round in turn, each on a ring of its own; tracing
    is off (this process never set VREPLICA_TRACE), which is what the comparison is about.
    The third set is compiled like the stripped one with nothing removed: its difference from
    the shipped modules is the method's own error ("control"), which should be near zero.
    """
    import importlib

    from common import trace

    if trace.ENABLED:
        raise RuntimeError("flush_trace_cost measures tracing off; unset VREPLICA_TRACE")
    shipped = {m: importlib.import_module(m) for m in STRIP_MODULES}
    stripped, guards = strip_trace_modules()
    control, _ = strip_trace_modules(strip=False)
    name = ipc_name("flush")
    mem = GuestMemory(name, 4 * SHM_SIZE, create=True)
    GuestMemory.unlink(name)  # the mapping stays; nothing is left in /dev/shm whatever happens
    try:
        rigs: list[_FlushRig] = []
        base = RING_BASE
        for mods in (shipped, stripped, control):
            rigs.append(_FlushRig(mods, mem, base, size))
            base = (rigs[-1].end + 4095) & ~4095
        for _ in range(max(3, rounds // 10)):
            for rig in rigs:
                rig.round()
        times: list[list[int]] = [[], [], []]
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for i in range(rounds):
                for k in range(3):  # each set goes first, second and third in turn
                    j = (i + k) % 3
                    times[j].append(rigs[j].round())
        finally:
            if gc_was:
                gc.enable()
    finally:
        mem.close()
    with_ns, without_ns, control_ns = (statistics.median(t) / QUEUE for t in times)
    return {"rounds": rounds, "packets_per_round": QUEUE, "size": size,
            "guards_stripped": guards, "ns_per_packet_shipped": with_ns,
            "ns_per_packet_stripped": without_ns, "ns_per_packet_control": control_ns,
            "cost": with_ns / without_ns - 1, "control": with_ns / control_ns - 1}
