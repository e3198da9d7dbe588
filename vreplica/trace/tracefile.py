"""The run's trace file: the three processes' dumps merged into one Chrome Trace Event JSON
file (what ui.perfetto.dev opens), the packets found in it, and one packet's call chain (or,
in an echo run, one round trip's: the datagram out to the host and its reply back).

Not part of the replicated system: the tooling around it, as QEMU's ``-trace`` output and a
trace viewer are around QEMU.

In the file, each process is a track (``guest (guestproc)``, ``kvm (kvmproc)``,
``qemu (qemuproc)``) with one track per thread; spans are complete events (``X``), trace
points instant events (``i``) with their arguments, timestamps microseconds of the shared
CLOCK_MONOTONIC. Each transmitted packet gets a flow (``s``/``t``/``f``) through the trace
points of its path, found by the ids they carry (the guest's ``udp_sendmsg`` and slirp's
``sosendto`` carry the datagram's sequence number, ``virtqueue_add_split`` and
``virtqueue_get_buf`` the descriptor head, QEMU's ``virtqueue_pop`` and ``virtqueue_fill``
the element, whose fake address stands for that head: ``common.trace.elem_head``) and, for
the steps that carry none, by time: the next such event after the previous step.

Each datagram that comes back from a host socket (an echo's reply) gets a flow of its own
(``rx packet``), from slirp's ``sorecvfrom`` to the guest socket's ``recvfrom``: by sequence
number (``sorecvfrom``, ``virtio_net_receive``, ``udp_rcv`` and ``recvfrom`` carry it), by
the RX descriptor head (``virtqueue_pop`` -> ``virtqueue_fill`` -> the guest's
``virtqueue_get_buf``) and by time for the rest.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from common.kvm_abi import ISA_IRQ_VECTOR_BASE, KVM_IOCTL_NR
from common.trace import elem_head, vq_index
from qemuproc.trace_events import hexaddr, pointer_args

ROLES = ("guest", "kvm", "qemu")
INTERRUPT_IOCTLS = (KVM_IOCTL_NR["KVM_SIGNAL_MSI"], KVM_IOCTL_NR["KVM_IRQ_LINE_STATUS"])
PROCESS_TITLES = {"guest": "guest (guestproc)", "kvm": "kvm (kvmproc)", "qemu": "qemu (qemuproc)"}
MAIN_THREAD_NAMES = {"guest": "vCPU 0", "kvm": "VM ioctls", "qemu": "main loop"}
EXITED_THREADS = "exited threads"
EXITED_TID_BASE = 1 << 30
FLOW_CAT = "packet"
FLOW_NAME = "tx packet"
RX_FLOW_NAME = "rx packet"
RX_FLOW_ID_BASE = 1 << 30
"""Reply flows are numbered apart from the datagrams' (seq + 1), so no viewer joins the two."""
TX, RX = "tx", "rx"
RUN_ON_GRACE_NS = 1_000_000
"""A loop iteration of the path (a thread's outermost span: ``main_loop_wait``, a KVM_RUN) may
end after the path's last step by as long as the path took, up to this; one that runs on for
another packet (a KVM_RUN through the next pause) is not the path's. A function inside an
iteration owns the rest of its time however long its thread was descheduled (the main loop
after its irqfd write, while the guest already took the interrupt), unless it also did
another packet's step."""

_RUN_PREFIX = re.compile(r"/vnr\.[0-9a-zA-Z]+\.")


VIRTQUEUE_ADDS = ("virtqueue_add_split", "virtqueue_add_packed")
"""The driver's add, as a split or a packed ring makes it: ``head`` is what the device's
element and the driver's virtqueue_get_buf name (the packed ring's buffer id)."""

class TraceError(Exception):
    """The file is not a trace this module can read, or lacks what was asked of it."""


@dataclass(eq=False, slots=True)
class Event:
    """One record of the merged trace: a span (``dur`` set) or a trace point (``dur`` None).

    ``ts`` and ``dur`` are nanoseconds of CLOCK_MONOTONIC; ``parent`` is the innermost span
    of the same thread that was open when the record was made.
    """

    ts: int
    role: str
    pid: int
    tid: int
    name: str
    args: dict[str, Any]
    dur: int | None = None
    parent: Event | None = None
    order: int = 0

    @property
    def end(self) -> int:
        return self.ts + (self.dur or 0)

    @property
    def is_span(self) -> bool:
        return self.dur is not None

    @property
    def thread_key(self) -> tuple[int, int]:
        return self.pid, self.tid

    def ancestors(self) -> Iterator[Event]:
        p = self.parent
        while p is not None:
            yield p
            p = p.parent


@dataclass
class Packet:
    """One datagram and the trace points of its path, in order: transmitted by the guest
    (``tx``: ``send`` is its ``udp_sendmsg``) or received by it (``rx``: ``send`` is slirp's
    ``sorecvfrom``, also the first step). ``head`` is its descriptor chain's, ``avail_idx``
    (tx) the avail index the guest published it at; ``origin`` is the span the chain starts
    with, when not ``send``'s own."""

    seq: int
    send: Event
    steps: list[Event]
    head: int | None = None
    avail_idx: int | None = None
    direction: str = TX
    origin: Event | None = None


class ChainStep(NamedTuple):
    """One line of a packet's call chain; ``ts`` and ``dur`` in microseconds; ``direction``
    tx (to the host) or rx (a reply, back to the guest)."""

    ts: float
    process: str
    thread: str
    depth: int
    name: str
    args: dict[str, Any]
    dur: float | None = None
    direction: str = TX


class _Index:
    """Trace points by name, in time order, for 'the next X after t' questions; spans by
    name too, for the steps that are functions with no trace point of their own."""

    def __init__(self, events: Iterable[Event]) -> None:
        self.by_name: dict[str, list[Event]] = {}
        self.spans: dict[str, list[Event]] = {}
        for ev in events:
            (self.spans if ev.is_span else self.by_name).setdefault(ev.name, []).append(ev)
        self.ts = {name: [e.ts for e in lst] for name, lst in self.by_name.items()}
        self.span_ts = {name: [e.ts for e in lst] for name, lst in self.spans.items()}
        self._keyed: dict[tuple[str, str], dict[Any, list[Event]]] = {}

    def next_span(self, name: str, after: int, *, before: int | None, pid: int, tid: int,
                  inside: str) -> Event | None:
        """The first span ``name`` of thread (pid, tid) in [after, before] that ran inside a
        span named ``inside``."""
        lst = self.spans.get(name, [])
        for i in range(bisect.bisect_left(self.span_ts.get(name, []), after), len(lst)):
            ev = lst[i]
            if ev.pid != pid or ev.tid != tid:
                continue
            if before is not None and ev.ts > before:
                return None
            if _ancestor(ev, inside) is not None:
                return ev
        return None

    def all(self, name: str) -> list[Event]:
        return self.by_name.get(name, [])

    def next_with(self, name: str, key: str, value: Any, after: int,
                  before: int | None = None) -> Event | None:
        """The first ``name`` at or after ``after`` whose argument ``key`` is ``value``."""
        keyed = self._keyed.get((name, key))
        if keyed is None:
            keyed = self._keyed[(name, key)] = {}
            for ev in self.all(name):
                keyed.setdefault(ev.args.get(key), []).append(ev)
        for ev in keyed.get(value, ()):
            if ev.ts >= after:
                return ev if before is None or ev.ts <= before else None
        return None

    def next(self, name: str, after: int, *, before: int | None = None, pid: int | None = None,
             tid: int | None = None, role: str | None = None,
             pred: Callable[[Event], bool] | None = None) -> Event | None:
        lst = self.by_name.get(name)
        if not lst:
            return None
        for i in range(bisect.bisect_left(self.ts[name], after), len(lst)):
            ev = lst[i]
            if before is not None and ev.ts > before:
                return None
            if (role is None or ev.role == role) and (pid is None or ev.pid == pid) \
                    and (tid is None or ev.tid == tid) and (pred is None or pred(ev)):
                return ev
        return None

    def prev(self, name: str, at: int, *, tid: int, pid: int,
             after: int | None = None) -> Event | None:
        lst = self.by_name.get(name)
        if not lst:
            return None
        for i in range(bisect.bisect_right(self.ts[name], at) - 1, -1, -1):
            ev = lst[i]
            if after is not None and ev.ts < after:
                return None
            if ev.tid == tid and ev.pid == pid:
                return ev
        return None


@dataclass
class Trace:
    """A merged trace: its events in time order, process and thread names, its packets."""

    events: list[Event]
    roles: dict[int, str]
    threads: dict[tuple[int, int], str]
    packets: dict[int, Packet] = field(default_factory=dict)
    replies: dict[int, Packet] = field(default_factory=dict)
    _index: _Index | None = None
    _by_thread: dict[tuple[int, int], list[Event]] | None = None

    @property
    def index(self) -> _Index:
        if self._index is None:
            self._index = _Index(self.events)
        return self._index

    def thread_events(self, key: tuple[int, int]) -> list[Event]:
        if self._by_thread is None:
            self._by_thread = {}
            for ev in self.events:
                self._by_thread.setdefault(ev.thread_key, []).append(ev)
        return self._by_thread.get(key, [])

    def thread_name(self, ev: Event) -> str:
        return self.threads.get(ev.thread_key, str(ev.tid))

    @property
    def start(self) -> int:
        return self.events[0].ts if self.events else 0


# -- reading the processes' dumps ---------------------------------------------------------------


def _thread_name(role: str, pid: int, tid: int, name: str) -> str:
    if tid == pid and name in ("MainThread", role):
        return MAIN_THREAD_NAMES.get(role, name)
    return _RUN_PREFIX.sub("", name)


def read_pieces(pieces: Iterable[Path | str]) -> Trace:
    """The records of ``trace.<role>.msgpack`` dumps, as one trace with spans paired up."""
    events: list[Event] = []
    roles: dict[int, str] = {}
    threads: dict[tuple[int, int], str] = {}
    order = 0
    for path in pieces:
        data = msgpack.unpackb(Path(path).read_bytes(), raw=False, strict_map_key=False)
        role, pid = data["role"], data["pid"]
        roles[pid] = role
        known = {int(ident): (tid, name) for ident, (tid, name) in data["threads"].items()}
        stacks: dict[int, list[Event]] = {}
        last = 0
        for ns, ident, ph, name, args in data["records"]:
            last = max(last, ns)
            if ident in known:
                tid = known[ident][0]
            else:
                tid = EXITED_TID_BASE + pid
                threads[(pid, tid)] = EXITED_THREADS
            stack = stacks.setdefault(ident, [])
            if ph == "E":
                if any(s.name == name for s in stack):
                    while stack:
                        top = stack.pop()
                        top.dur = ns - top.ts
                        if top.name == name:
                            break
                continue
            order += 1
            args = dict(args or {})
            for a in pointer_args(name):
                if a in args:
                    args[a] = hexaddr(args[a])
            ev = Event(ns, role, pid, tid, name, args,
                       -1 if ph == "B" else None, stack[-1] if stack else None, order)
            events.append(ev)
            if ph == "B":
                stack.append(ev)
        for stack in stacks.values():
            for ev in stack:
                ev.dur = last - ev.ts
                ev.args["unfinished"] = True
        for tid, name in known.values():
            threads[(pid, tid)] = _thread_name(role, pid, tid, name)
    events.sort(key=lambda e: (e.ts, e.order))
    return Trace(events, roles, threads)


# -- finding the packets ------------------------------------------------------------------------


def _is_tx_driver(vq: Any) -> bool:
    return str(vq).startswith("output")


def _device_vq(driver_vq: str) -> Callable[[Any], bool]:
    """QEMU's VirtQueue for the guest's TX queue ``output.N``: virtqueue 2N+1."""
    try:
        index = 2 * int(driver_vq.split(".")[1]) + 1
    except (IndexError, ValueError):
        return lambda vq: (vq_index(vq) or 0) % 2 == 1
    return lambda vq: vq_index(vq) == index


def _head(elem: Any) -> int | None:
    """The descriptor head a replica element address stands for."""
    found = elem_head(elem)
    return found[1] if found is not None else None


def _monotonic(steps: Iterable[Event | None]) -> list[Event]:
    out: list[Event] = []
    for ev in steps:
        if ev is not None and (not out or ev.ts >= out[-1].ts) and ev not in out:
            out.append(ev)
    return out


def _kick_steps(ix: _Index, add: Event, limit: int | None,
                is_dev_vq: Callable[[Any], bool]) -> list[Event]:
    """vp_notify -> the VM exit in KVM (a port write, or an MMIO store on the modern transport)
    -> ioeventfd (or the exit to QEMU) -> virtio_queue_notify."""
    vq = add.args.get("vq")
    notify = ix.next("vp_notify", add.ts, before=limit, pid=add.pid, tid=add.tid,
                     pred=lambda e: e.args.get("vq") == vq)
    if notify is None:
        return []
    steps = [notify]
    port, addr = notify.args.get("port"), notify.args.get("addr")
    if port is None and addr is not None:  # the modern transport: an MMIO store
        pio = ix.next("kvm_mmio", notify.ts, before=limit, role="kvm",
                      pred=lambda e: e.args.get("gpa") == addr and e.args.get("type") == 2)
    else:
        pio = ix.next("kvm_pio", notify.ts, before=limit, role="kvm",
                      pred=lambda e: e.args.get("port") == port and e.args.get("rw") == 1)
    if pio is not None:
        vmexit = ix.prev("kvm_exit", pio.ts, tid=pio.tid, pid=pio.pid)
        if vmexit is not None and vmexit.ts >= notify.ts:
            steps.append(vmexit)
        steps.append(pio)
        entry = ix.next("kvm_entry", pio.ts, pid=pio.pid, tid=pio.tid)
        ioev = ix.next("ioeventfd_write", pio.ts, before=entry.ts if entry else limit,
                       pid=pio.pid, tid=pio.tid)
        if ioev is not None:
            steps.append(ioev)
        else:
            uexit = ix.next("kvm_userspace_exit", pio.ts, before=limit, pid=pio.pid, tid=pio.tid)
            if uexit is not None:
                steps.append(uexit)
                run_exit = ix.next("kvm_run_exit", uexit.ts, before=limit, role="qemu")
                if run_exit is not None:
                    steps.append(run_exit)
    qnotify = ix.next("virtio_queue_notify", steps[-1].ts, before=limit, role="qemu",
                      pred=lambda e: is_dev_vq(e.args.get("vq")))
    if qnotify is not None:
        steps.append(qnotify)
    return steps


def _interrupt_steps(ix: _Index, vnotify: Event, guest_pid: int, driver_vq: Any,
                     limit: int | None, callback: str = "skb_xmit_done") -> list[Event]:
    """virtio_notify -> QEMU's VM ioctl (KVM_SIGNAL_MSI, or KVM_IRQ_LINE_STATUS raising the
    INTx line) -> KVM's delivery to the local APIC -> injected at an entry -> the guest's
    handler and the queue's ``callback``. An interrupt already on its way (a shared line or
    vector the guest has not serviced yet) carries this notification too: then the steps go
    on from the last one found to the queue's ``vring_interrupt``, up to ``limit`` (the
    guest's reclaim)."""
    bound = vnotify.parent.end if vnotify.parent else None
    ioctl = ix.next("kvm_vm_ioctl", vnotify.ts, pid=vnotify.pid, tid=vnotify.tid, before=bound,
                    pred=lambda e: e.args.get("type") in INTERRUPT_IOCTLS)
    steps: list[Event] = []
    if ioctl is not None:
        steps.append(ioctl)
        vector = None
        if ioctl.args.get("type") == KVM_IOCTL_NR["KVM_SIGNAL_MSI"]:
            deliver = ix.next("kvm_msi_set_irq", ioctl.ts, before=limit, role="kvm")
            if deliver is not None:
                vector = deliver.args.get("data", 0) & 0xFF
        else:
            deliver = ix.next("kvm_set_irq", ioctl.ts, before=limit, role="kvm",
                              pred=lambda e: e.args.get("level") == 1)
            if deliver is not None:
                vector = ISA_IRQ_VECTOR_BASE + deliver.args.get("gsi", 0)
        if deliver is not None:
            steps.append(deliver)
            inj = ix.next("kvm_inj_virq", deliver.ts, before=limit, role="kvm",
                          pred=lambda e: e.args.get("irq") == vector)
            if inj is not None:
                steps.append(inj)
                entry = ix.next("irq_handler_entry", inj.ts, before=limit, pid=guest_pid,
                                pred=lambda e: e.args.get("irq") == vector)
                if entry is not None:
                    steps.append(entry)
    elif limit is None:
        return []
    vint = ix.next("vring_interrupt", (steps[-1] if steps else vnotify).ts, before=limit,
                   pid=guest_pid, pred=lambda e: e.args.get("vq") == driver_vq)
    if vint is not None:
        steps.append(vint)
        done = ix.next(callback, vint.ts, before=vint.parent.end if vint.parent else limit,
                       pid=guest_pid, tid=vint.tid)
        if done is not None:
            steps.append(done)
    return steps


def _correlate(ix: _Index, send: Event, seq: int) -> Packet | None:
    g_pid, g_tid = send.pid, send.tid
    xmit = ix.next("start_xmit", send.ts, pid=g_pid, tid=g_tid)
    adds = [ix.next(name, xmit.ts if xmit else send.ts, pid=g_pid, tid=g_tid,
                    pred=lambda e: _is_tx_driver(e.args.get("vq"))) for name in VIRTQUEUE_ADDS]
    add = min((a for a in adds if a is not None), key=lambda e: e.ts, default=None)
    if add is None:
        return None
    head, avail_idx = add.args.get("head"), add.args.get("avail_idx", add.args.get("pos"))
    driver_vq = add.args.get("vq")
    is_dev_vq = _device_vq(str(driver_vq))
    pop = ix.next("virtqueue_pop", add.ts, role="qemu",
                  pred=lambda e: is_dev_vq(e.args.get("vq")) and _head(e.args.get("elem")) == head)
    steps: list[Event | None] = [xmit, add]
    steps += _kick_steps(ix, add, pop.ts if pop else None, is_dev_vq)
    if pop is not None:
        sent = ix.next("sosendto", pop.ts, role="qemu", pred=lambda e: e.args.get("seq") == seq)
        fill = ix.next("virtqueue_fill", (sent or pop).ts, pid=pop.pid, tid=pop.tid,
                       pred=lambda e: is_dev_vq(e.args.get("vq"))
                       and e.args.get("elem") == pop.args.get("elem"))
        flush = vnotify = None
        if fill is not None:
            flush = ix.next("virtqueue_flush", fill.ts, pid=fill.pid, tid=fill.tid,
                            pred=lambda e: is_dev_vq(e.args.get("vq")))
        if flush is not None:
            vnotify = ix.next("virtio_notify", flush.ts, role="qemu",
                              pred=lambda e: is_dev_vq(e.args.get("vq")))
        reclaim = ix.next("virtqueue_get_buf", (fill or pop).ts, pid=g_pid,
                          pred=lambda e: e.args.get("vq") == driver_vq
                          and e.args.get("head") == head)
        limit = reclaim.ts if reclaim is not None else None
        steps += [pop, sent, fill, flush]
        if vnotify is not None and (limit is None or vnotify.ts <= limit):
            steps.append(vnotify)
            steps += _interrupt_steps(ix, vnotify, g_pid, driver_vq, limit)
        steps.append(reclaim)
    return Packet(seq, send, _monotonic(steps), head, avail_idx)


def find_packets(trace: Trace) -> dict[int, Packet]:
    """Each datagram the guest sent (by sequence number) and its path through the processes."""
    ix = trace.index
    packets: dict[int, Packet] = {}
    for send in ix.all("udp_sendmsg"):
        seq = send.args.get("seq")
        if not isinstance(seq, int) or seq < 0 or seq in packets:
            continue
        p = _correlate(ix, send, seq)
        if p is not None:
            packets[seq] = p
    return packets


def _driver_rx_vq(dev_vq: Any) -> str:
    """The guest's name for QEMU's RX queue 2N: ``input.N``."""
    return f"input.{(vq_index(dev_vq) or 0) // 2}"


def _rx_origin(recv: Event) -> Event:
    """Where a reply's chain starts: the main loop's ``slirp_pollfds_poll`` that read it."""
    poll = _ancestor(recv, "slirp_pollfds_poll")
    if poll is not None:
        return poll
    return recv.parent if recv.parent is not None and recv.parent.name == recv.name else recv


def _ancestor(ev: Event, name: str) -> Event | None:
    return next((a for a in ev.ancestors() if a.name == name), None)


def _correlate_rx(ix: _Index, recv: Event, seq: int, guest_pid: int | None) -> Packet:
    """A reply from ``sorecvfrom`` on: slirp's output to the NIC, ``virtio_net_receive`` into
    a guest RX buffer, the interrupt, and the guest's NAPI poll up to its socket."""
    q_pid, q_tid = recv.pid, recv.tid
    later = ix.next("sorecvfrom", recv.ts, pid=q_pid, tid=q_tid, pred=lambda e: e is not recv)
    vnr = ix.next_with("virtio_net_receive", "seq", seq, recv.ts)
    if vnr is None:  # a trace whose virtio_net_receive carries no seq
        vnr = ix.next("virtio_net_receive", recv.ts, pid=q_pid, tid=q_tid,
                      before=later.ts if later else None)
    upto = vnr.ts if vnr is not None else (later.ts if later else None)
    out = ix.next("slirp_output", recv.ts, before=upto, pid=q_pid, tid=q_tid)
    send_iov = ix.next_span("qemu_net_queue_send_iov", (out or recv).ts, before=upto,
                            pid=q_pid, tid=q_tid, inside="slirp_output")
    steps: list[Event | None] = [recv, out, send_iov]
    p = Packet(seq, recv, [], direction=RX, origin=_rx_origin(recv))
    if vnr is None:
        p.steps = _monotonic(steps)
        return p
    nc = _ancestor(vnr, "nc_sendv_compat")  # at once, or later from the NIC's queue
    span = vnr.parent if vnr.parent is not None and vnr.parent.name == vnr.name else None
    bound = span.end if span is not None else None

    def on_rx(e: Event) -> bool:
        return (vq_index(e.args.get("vq")) or 0) % 2 == 0

    pop = ix.next("virtqueue_pop", vnr.ts, before=bound, pid=vnr.pid, tid=vnr.tid, pred=on_rx)
    steps += [nc, vnr, pop]
    if pop is None or guest_pid is None:
        p.steps = _monotonic(steps)
        return p
    p.head = _head(pop.args.get("elem"))
    dev_vq = pop.args.get("vq")
    driver_vq = _driver_rx_vq(dev_vq)
    fill = ix.next("virtqueue_fill", pop.ts, before=bound, pid=pop.pid, tid=pop.tid,
                   pred=lambda e: e.args.get("vq") == dev_vq
                   and e.args.get("elem") == pop.args.get("elem"))
    flush = vnotify = None
    if fill is not None:
        flush = ix.next("virtqueue_flush", fill.ts, before=bound, pid=fill.pid, tid=fill.tid,
                        pred=lambda e: e.args.get("vq") == dev_vq)
    if flush is not None:
        vnotify = ix.next("virtio_notify", flush.ts, before=bound, pid=flush.pid, tid=flush.tid,
                          pred=lambda e: e.args.get("vq") == dev_vq)
    reclaim = ix.next("virtqueue_get_buf", (fill or pop).ts, pid=guest_pid,
                      pred=lambda e: e.args.get("vq") == driver_vq
                      and e.args.get("head") == p.head)
    limit = reclaim.ts if reclaim is not None else None
    steps += [fill, flush]
    if vnotify is not None and (limit is None or vnotify.ts <= limit):
        steps.append(vnotify)
        steps += _interrupt_steps(ix, vnotify, guest_pid, driver_vq, limit, "skb_recv_done")
    if reclaim is not None:
        napi = ix.prev("napi_poll", reclaim.ts, pid=reclaim.pid, tid=reclaim.tid,
                       after=(fill or pop).ts)
        if napi is not None and napi.args.get("napi") != f"virtnet_poll/{driver_vq}":
            napi = None
        poll = _ancestor(reclaim, "virtnet_receive")
        end = poll.end if poll is not None else None
        rb = ix.next("receive_buf", reclaim.ts, before=end, pid=reclaim.pid, tid=reclaim.tid,
                     pred=lambda e: e.args.get("vq") == driver_vq)
        netif = ix.next("netif_receive_skb", rb.ts, before=end, pid=rb.pid,
                        tid=rb.tid) if rb is not None else None
        udp = ix.next_with("udp_rcv", "seq", seq, (netif or reclaim).ts, before=end)
        sock = ix.next_with("recvfrom", "seq", seq, (udp or netif or reclaim).ts)
        steps += [napi, reclaim, rb, netif, udp, sock]
    p.steps = _monotonic(steps)
    return p


def find_replies(trace: Trace) -> dict[int, Packet]:
    """Each datagram slirp read from a host socket for the guest (an echo's reply), by the
    sequence number in its payload, and its path to the guest's socket."""
    ix = trace.index
    guest_pid = next((pid for pid, role in trace.roles.items() if role == "guest"), None)
    replies: dict[int, Packet] = {}
    for recv in ix.all("sorecvfrom"):
        seq = recv.args.get("seq")
        if isinstance(seq, int) and seq >= 0 and seq not in replies:
            replies[seq] = _correlate_rx(ix, recv, seq, guest_pid)
    return replies


# -- writing Chrome Trace Event JSON ------------------------------------------------------------


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def _metadata(trace: Trace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for pid, role in trace.roles.items():
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": pid,
                    "args": {"name": PROCESS_TITLES.get(role, role)}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": pid,
                    "args": {"sort_index": ROLES.index(role) if role in ROLES else 9}})
    for (pid, tid), name in trace.threads.items():
        out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                    "args": {"name": name}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                    "args": {"sort_index": 0 if tid == pid else tid - pid + 1}})
    return out


def _flows(packets: dict[int, Packet], replies: dict[int, Packet] | None = None,
           ) -> dict[Event, list[dict[str, Any]]]:
    """Flow events per step event: ``s`` at the first step, ``t`` between, ``f`` at the last;
    one flow per transmitted datagram (id seq + 1) and one per reply (RX_FLOW_ID_BASE + seq + 1)."""
    out: dict[Event, list[dict[str, Any]]] = {}
    for group, name, base in ((packets, FLOW_NAME, 0), (replies or {}, RX_FLOW_NAME,
                                                          RX_FLOW_ID_BASE)):
        for seq, p in group.items():
            n = len(p.steps)
            if n < 2:
                continue
            for i, ev in enumerate(p.steps):
                ph = "s" if i == 0 else ("f" if i == n - 1 else "t")
                flow = {"ph": ph, "id": base + seq + 1, "cat": FLOW_CAT, "name": name,
                        "pid": ev.pid, "tid": ev.tid, "ts": _us(ev.ts),
                        "args": {"seq": seq, "step": ev.name}}
                if ph == "f":
                    flow["bp"] = "e"
                out.setdefault(ev, []).append(flow)
    return out


def _chrome_event(ev: Event) -> dict[str, Any]:
    d: dict[str, Any] = {"name": ev.name, "pid": ev.pid, "tid": ev.tid, "ts": _us(ev.ts)}
    if ev.is_span:
        d["ph"] = "X"
        d["cat"] = "function"
        d["dur"] = _us(ev.dur or 0)
    else:
        d["ph"] = "i"
        d["s"] = "t"
        d["cat"] = "tracepoint"
    if ev.args:
        d["args"] = ev.args
    return d


def write_chrome_json(trace: Trace, out: str | Path) -> None:
    """Write ``trace`` (with a flow per packet and reply) as Chrome Trace Event JSON, one event
    a line."""
    flows = _flows(trace.packets, trace.replies)
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode
    with tmp.open("w") as f:
        f.write('{"displayTimeUnit":"ns","otherData":{"clock":"CLOCK_MONOTONIC",'
                '"source":"virtio-net-replica"},"traceEvents":[\n')
        first = True
        for d in _metadata(trace):
            f.write(("" if first else ",\n") + dumps(d))
            first = False
        for ev in trace.events:
            f.write(("" if first else ",\n") + dumps(_chrome_event(ev)))
            first = False
            for flow in flows.get(ev, ()):
                f.write(",\n" + dumps(flow))
        f.write("\n]}\n")
    tmp.replace(path)


def merge_traces(pieces: list[Path], out: str) -> Trace:
    """Merge the processes' ``trace.<role>.msgpack`` dumps into Chrome Trace Event JSON, or,
    for a ``.log`` file, into QEMU's log-backend text (``vreplica.trace.tracelog``)."""
    trace = read_pieces(pieces)
    if str(out).endswith(".log"):
        from vreplica.trace.tracelog import write_qemu_log

        write_qemu_log(trace.events, out)
        return trace
    trace.packets = find_packets(trace)
    trace.replies = find_replies(trace)
    write_chrome_json(trace, out)
    return trace


# -- reading Chrome Trace Event JSON back --------------------------------------------------------


def _ns(us: Any) -> int:
    return round(float(us) * 1000)


def load_trace(path: str | Path) -> Trace:
    """Read a file written by ``merge_traces`` (spans, trace points, names, flows)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TraceError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(f"{path}: not a JSON trace ({e})") from None
    raw = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(raw, list):
        raise TraceError(f"{path}: no traceEvents list")
    roles: dict[int, str] = {}
    threads: dict[tuple[int, int], str] = {}
    events: list[Event] = []
    flow_points: dict[tuple[str, int], list[tuple[int, int, int, str, int]]] = {}
    try:
        for order, d in enumerate(raw):
            ph = d.get("ph")
            if ph == "M":
                name = d.get("args", {}).get("name")
                if d.get("name") == "process_name" and name:
                    roles[d["pid"]] = str(name).split(" ")[0]
                elif d.get("name") == "thread_name" and name:
                    threads[(d["pid"], d["tid"])] = str(name)
            elif ph in ("X", "i", "I"):
                dur = _ns(d.get("dur", 0)) if ph == "X" else None
                events.append(Event(_ns(d["ts"]), "", d["pid"], d["tid"], d["name"],
                                    dict(d.get("args") or {}), dur, None, order))
            elif ph in ("s", "t", "f") and d.get("cat") == FLOW_CAT:
                a = d.get("args") or {}
                flow_points.setdefault((str(d.get("name", FLOW_NAME)), int(d["id"])), []).append(
                    (d["pid"], d["tid"], _ns(d["ts"]), str(a.get("step", "")),
                     int(a.get("seq", int(d["id"]) - 1))))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TraceError(f"{path}: malformed trace event ({e!r})") from None
    for ev in events:
        ev.role = roles.get(ev.pid, str(ev.pid))
    events.sort(key=lambda e: (e.ts, e.order))
    trace = Trace(events, roles, threads)
    for key in {e.thread_key for e in events}:
        stack: list[Event] = []
        for ev in trace.thread_events(key):
            while stack and stack[-1].end < ev.ts:
                stack.pop()
            ev.parent = stack[-1] if stack else None
            if ev.is_span:
                stack.append(ev)
    tx = {k: v for k, v in flow_points.items() if k[0] != RX_FLOW_NAME}
    rx = {k: v for k, v in flow_points.items() if k[0] == RX_FLOW_NAME}
    trace.packets = _packets_from_flows(trace, tx) or find_packets(trace)
    trace.replies = _replies_from_flows(trace, rx) or find_replies(trace)
    return trace


def _flow_steps(trace: Trace, points: list[tuple]) -> list[Event]:
    steps: list[Event] = []
    for pid, tid, ts, step, _ in points:
        evs = trace.thread_events((pid, tid))
        i = _bisect_events(evs, ts)
        same = []
        while i < len(evs) and evs[i].ts == ts:
            if evs[i].name == step:
                same.append(evs[i])
            i += 1
        if same:  # a trace point rather than its function's span of the same instant
            steps.append(min(same, key=lambda e: e.is_span))
    return steps


def _packets_from_flows(trace: Trace, flow_points: dict[Any, list[tuple]]) -> dict[int, Packet]:
    packets: dict[int, Packet] = {}
    sends = {e.args.get("seq"): e for e in reversed(trace.index.all("udp_sendmsg"))}
    for points in flow_points.values():
        steps = _flow_steps(trace, points)
        seq = points[0][4]
        send = sends.get(seq)
        if send is not None and steps:
            add = next((e for e in steps if e.name in VIRTQUEUE_ADDS), None)
            packets[seq] = Packet(seq, send, steps, add.args.get("head") if add else None,
                                  add.args.get("avail_idx", add.args.get("pos"))
                                  if add else None)
    return packets


def _replies_from_flows(trace: Trace, flow_points: dict[Any, list[tuple]]) -> dict[int, Packet]:
    replies: dict[int, Packet] = {}
    for points in flow_points.values():
        steps = _flow_steps(trace, points)
        if not steps or steps[0].name != "sorecvfrom":
            continue
        seq = points[0][4]
        pop = next((e for e in steps if e.name == "virtqueue_pop"), None)
        replies[seq] = Packet(seq, steps[0], steps, _head(pop.args.get("elem")) if pop else None,
                              None, RX, _rx_origin(steps[0]))
    return replies


def _bisect_events(evs: list[Event], ts: int) -> int:
    """The index of the first of ``evs`` (in time order) at or after ``ts``."""
    return bisect.bisect_left(evs, ts, key=lambda e: e.ts)


# -- one packet's call chain --------------------------------------------------------------------


def _missing(seq: int, group: dict[int, Packet], what: str) -> TraceError:
    known = sorted(group)
    have = f"{known[0]}..{known[-1]}" if known else "none"
    return TraceError(f"no {what} with seq {seq} in the trace ({what}s found: {have})")


def packet(trace: Trace, seq: int, direction: str = TX) -> Packet:
    """Datagram ``seq`` as the guest sent it (``tx``) or its reply as it came back (``rx``)."""
    group, what = (trace.replies, "reply") if direction == RX else (trace.packets, "packet")
    p = group.get(seq)
    if p is None:
        raise _missing(seq, group, what)
    return p


def _unit(ev: Event, floor: int | None, ceiling: int | None,
          foreign: Callable[[Event], bool] = lambda span: True) -> Event:
    """``ev``'s outermost enclosing span that began at ``floor`` and ended by ``ceiling``; a
    function span inside a loop iteration (one with a parent) that ended later still counts
    unless it holds a ``foreign`` step: its thread was descheduled in mid-function."""
    u = ev
    for a in ev.ancestors():
        if floor is not None and a.ts < floor:
            break
        if ceiling is not None and a.end > ceiling and (a.parent is None or foreign(a)):
            break
        u = a
    return u


def _holds_foreign_step(trace: Trace, p: Packet) -> Callable[[Event], bool]:
    """Whether a span holds a step of another packet of ``p``'s direction."""
    group = trace.packets if p.direction == TX else trace.replies
    others = {id(e) for q in group.values() if q is not p for e in _anchors(q)}

    def holds(span: Event) -> bool:
        evs = trace.thread_events(span.thread_key)
        for i in range(_bisect_events(evs, span.ts), len(evs)):
            ev = evs[i]
            if ev.ts > span.end:
                return False
            if id(ev) in others and any(a is span for a in ev.ancestors()):
                return True
        return False

    return holds


def _anchors(p: Packet) -> list[Event]:
    return [p.send] + [e for e in p.steps if e is not p.send]


def _chain(trace: Trace, p: Packet) -> tuple[list[Event], list[Event]]:
    anchors = _anchors(p)
    first = p.origin or _unit(p.send, None, None)
    end = max(first.end, _unit(anchors[-1], anchors[-2].ts, None).end) \
        if len(anchors) > 1 else first.end
    ceiling = end + min(end - first.ts, RUN_ON_GRACE_NS)
    foreign = _holds_foreign_step(trace, p)
    units = [first] + [_unit(ev, prev.ts, ceiling, foreign)
                       for prev, ev in zip(anchors, anchors[1:], strict=False)]
    members: set[Event] = set()
    for u in units:
        if u in members:
            continue
        members.add(u)
        if not u.is_span:
            continue
        evs = trace.thread_events(u.thread_key)
        for i in range(_bisect_events(evs, u.ts), len(evs)):
            ev = evs[i]
            if ev.ts > u.end:
                break
            if ev is not u and any(a is u for a in ev.ancestors()):
                members.add(ev)
    chain = sorted(members, key=lambda e: (e.ts, e.order))
    return chain, _context(chain, members)


def _context(chain: list[Event], members: set[Event]) -> list[Event]:
    context: list[Event] = []
    seen: set[Event] = set()
    for ev in chain:
        for a in ev.ancestors():
            if a not in members and a not in seen:
                seen.add(a)
                context.append(a)
    context.sort(key=lambda e: (e.ts, e.order))
    return context


def chain_events(trace: Trace, seq: int, direction: str = TX) -> tuple[list[Event], list[Event]]:
    """The events of packet ``seq``'s path, and the spans they ran inside of ("context").

    The path is made of units, each with everything that ran inside it: the first event (the
    guest's ``udp_sendmsg``; for a reply, the ``slirp_pollfds_poll`` that read it), and for
    each later step its outermost enclosing span that began after the previous step and
    ended with the first unit or the last step's unit at the latest, give or take
    ``RUN_ON_GRACE_NS`` (so a main loop iteration or a KVM_RUN that was already running, or
    ran on, is not part of it), or, inside such an iteration, ended later with no other
    packet's step in it. Context
    spans are the units' enclosing spans that began earlier (``main_loop_wait``,
    ``kvm_arch_vcpu_ioctl_run``, ...).
    """
    return _chain(trace, packet(trace, seq, direction))


def _own(trace: Trace, anchors: list[Event], others: list[Event]) -> set[Event]:
    """The subtrees that belong to ``anchors``' direction alone: for each anchor not shared
    with ``others``, its outermost enclosing span that holds none of them (with the
    ``napi_poll`` trace point that announced it), so that a softirq that completed the send
    and received the reply is split between the two."""
    shared = set(others)
    holds: set[Event] = set()
    for o in others:
        holds.update(o.ancestors())
    roots: set[Event] = set()
    for a in anchors:
        if a in shared:
            continue
        r = a
        while r.parent is not None and r.parent not in holds and r.parent not in shared:
            r = r.parent
        roots.add(r)
        evs = trace.thread_events(r.thread_key)
        i = _bisect_events(evs, r.ts) - 1
        while i >= 0 and evs[i].parent is not r.parent:
            i -= 1
        if i >= 0 and evs[i].name == "napi_poll" and evs[i] not in shared:
            roots.add(evs[i])
    return roots


def _outside(chain: list[Event], roots: set[Event]) -> list[Event]:
    return [e for e in chain if e not in roots and not any(a in roots for a in e.ancestors())]


def round_trip_events(trace: Trace, seq: int) -> tuple[tuple[list[Event], list[Event]],
                                                       tuple[list[Event], list[Event]]]:
    """(chain, context) of datagram ``seq`` to the host and of its reply back to the guest.

    Where one span served both (the softirq that reclaimed the sent buffer and received the
    reply, an interrupt injection carrying both vectors), each direction keeps it with its
    own part of what ran inside it.
    """
    tx, rx = packet(trace, seq, TX), packet(trace, seq, RX)
    tx_chain, _ = _chain(trace, tx)
    rx_chain, _ = _chain(trace, rx)
    tx_chain = _outside(tx_chain, _own(trace, _anchors(rx), _anchors(tx)))
    rx_chain = _outside(rx_chain, _own(trace, _anchors(tx), _anchors(rx)))
    return ((tx_chain, _context(tx_chain, set(tx_chain))),
            (rx_chain, _context(rx_chain, set(rx_chain))))


def _steps(trace: Trace, events: list[Event], within: set[Event],
           direction: str = TX) -> list[ChainStep]:
    return [ChainStep(ev.ts / 1000, ev.role, trace.thread_name(ev),
                      sum(1 for a in ev.ancestors() if a in within), ev.name, dict(ev.args),
                      ev.dur / 1000 if ev.dur is not None else None, direction) for ev in events]


def _load(trace: Trace | str | Path) -> Trace:
    return trace if isinstance(trace, Trace) else load_trace(trace)


def packet_chain(trace: Trace | str | Path, seq: int, direction: str = TX) -> list[ChainStep]:
    """Packet ``seq``'s path from the guest's first event for it (``udp_sendmsg``) to the end of
    its completion handling (``rx``: its reply's, from slirp's ``slirp_pollfds_poll`` to the
    guest socket's ``recvfrom``): (ts, process, thread, depth, name, args), in time order,
    depth counting the enclosing spans that belong to the chain."""
    t = _load(trace)
    chain, _ = chain_events(t, seq, direction)
    return _steps(t, chain, set(chain), direction)


def packet_context(trace: Trace | str | Path, seq: int, direction: str = TX) -> list[ChainStep]:
    """The spans packet ``seq``'s chain ran inside of, that began before it."""
    t = _load(trace)
    _, context = chain_events(t, seq, direction)
    return _steps(t, context, set(context), direction)


def round_trip_chain(trace: Trace | str | Path, seq: int) -> list[ChainStep]:
    """One round trip of an echo run: datagram ``seq``'s chain to the host (``direction``
    ``tx``, from ``udp_sendmsg``), then its reply's back to the guest (``rx``, ending at the
    guest socket's ``recvfrom``), each in time order (the two overlap in time: the reply
    is on its way while the guest still completes the send)."""
    t = _load(trace)
    (tx, _), (rx, _) = round_trip_events(t, seq)
    return _steps(t, tx, set(tx), TX) + _steps(t, rx, set(rx), RX)
