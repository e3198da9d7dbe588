"""The run's trace file: the three processes' dumps merged into one Chrome Trace Event JSON
file (what ui.perfetto.dev opens), the packets found in it, and one packet's call chain.

Not part of the replicated system: the tooling around it, as QEMU's ``-trace`` output and a
trace viewer are around QEMU.

In the file, each process is a track (``guest (guestproc)``, ``kvm (kvmproc)``,
``qemu (qemuproc)``) with one track per thread; spans are complete events (``X``), trace
points instant events (``i``) with their arguments, timestamps microseconds of the shared
CLOCK_MONOTONIC. Each transmitted packet gets a flow (``s``/``t``/``f``) through the trace
points of its path, found by the ids they carry (the guest's ``udp_sendmsg`` and slirp's
``sosendto`` carry the datagram's sequence number, ``virtqueue_add_split`` and
``virtqueue_pop`` the avail index, ``virtqueue_fill`` and ``virtqueue_get_buf`` the
descriptor head) and, for the steps that carry none, by time: the next such event after the
previous step.
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

ROLES = ("guest", "kvm", "qemu")
PROCESS_TITLES = {"guest": "guest (guestproc)", "kvm": "kvm (kvmproc)", "qemu": "qemu (qemuproc)"}
MAIN_THREAD_NAMES = {"guest": "vCPU 0", "kvm": "VM ioctls", "qemu": "main loop"}
EXITED_THREADS = "exited threads"
EXITED_TID_BASE = 1 << 30
FLOW_CAT = "packet"
FLOW_NAME = "tx packet"
ISA_IRQ_VECTOR_BASE = 0x30

_RUN_PREFIX = re.compile(r"/vnr\.[0-9a-zA-Z]+\.")


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
    """One transmitted datagram and the trace points of its path, in order."""

    seq: int
    send: Event
    steps: list[Event]
    head: int | None = None
    avail_idx: int | None = None


class ChainStep(NamedTuple):
    """One line of a packet's call chain; ``ts`` and ``dur`` in microseconds."""

    ts: float
    process: str
    thread: str
    depth: int
    name: str
    args: dict[str, Any]
    dur: float | None = None


class _Index:
    """Trace points by name, in time order, for 'the next X after t' questions."""

    def __init__(self, events: Iterable[Event]) -> None:
        self.by_name: dict[str, list[Event]] = {}
        for ev in events:
            if not ev.is_span:
                self.by_name.setdefault(ev.name, []).append(ev)
        self.ts = {name: [e.ts for e in lst] for name, lst in self.by_name.items()}

    def all(self, name: str) -> list[Event]:
        return self.by_name.get(name, [])

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

    def prev(self, name: str, at: int, *, tid: int, pid: int) -> Event | None:
        lst = self.by_name.get(name)
        if not lst:
            return None
        for i in range(bisect.bisect_right(self.ts[name], at) - 1, -1, -1):
            ev = lst[i]
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
            ev = Event(ns, role, pid, tid, name, dict(args or {}),
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
    """QEMU's name for the guest's TX queue ``output.N``: ``TX(q2N+1)`` (virtqueue 2N+1)."""
    try:
        name = f"TX(q{2 * int(driver_vq.split('.')[1]) + 1})"
    except (IndexError, ValueError):
        return lambda vq: str(vq).startswith("TX")
    return lambda vq: vq == name


def _monotonic(steps: Iterable[Event | None]) -> list[Event]:
    out: list[Event] = []
    for ev in steps:
        if ev is not None and (not out or ev.ts >= out[-1].ts) and ev not in out:
            out.append(ev)
    return out


def _kick_steps(ix: _Index, add: Event, limit: int | None,
                is_dev_vq: Callable[[Any], bool]) -> list[Event]:
    """vp_notify -> the VM exit in KVM -> ioeventfd (or the exit to QEMU) -> virtio_queue_notify."""
    vq = add.args.get("vq")
    notify = ix.next("vp_notify", add.ts, before=limit, pid=add.pid, tid=add.tid,
                     pred=lambda e: e.args.get("vq") == vq)
    if notify is None:
        return []
    steps = [notify]
    port = notify.args.get("port")
    pio = ix.next("kvm_pio", notify.ts, before=limit, role="kvm",
                  pred=lambda e: e.args.get("port") == port and e.args.get("rw") == "write")
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
                     limit: int | None, msi_gsi: dict[int, int]) -> list[Event]:
    """virtio_notify -> irqfd in KVM -> injected at the next entry -> the guest's handler."""
    pci = ix.next("virtio_pci_notify", vnotify.ts, pid=vnotify.pid, tid=vnotify.tid,
                  before=vnotify.parent.end if vnotify.parent else None)
    gsi = msi_gsi.get(pci.args.get("vector")) if pci is not None else None
    wake = ix.next("irqfd_wakeup", vnotify.ts, before=limit, role="kvm",
                   pred=lambda e: gsi is None or e.args.get("gsi") == gsi)
    if wake is None:
        return []
    steps = [wake]
    bound = wake.parent.end if wake.parent is not None else None
    vector = None
    msi = ix.next("kvm_msi_set_irq", wake.ts, before=bound, pid=wake.pid, tid=wake.tid)
    if msi is not None:
        vector = msi.args.get("vector", 0) & 0xFF
    else:
        line = ix.next("kvm_set_irq", wake.ts, before=bound, pid=wake.pid, tid=wake.tid)
        if line is not None:
            vector = ISA_IRQ_VECTOR_BASE + line.args.get("pin", 0)
    inj = ix.next("kvm_inj_virq", wake.ts, before=limit, role="kvm",
                  pred=lambda e: vector is None or vector in (e.args.get("vectors") or ()))
    if inj is None:
        return steps
    steps.append(inj)
    entry = ix.next("irq_handler_entry", inj.ts, before=limit, pid=guest_pid,
                    pred=lambda e: vector is None or e.args.get("irq") == vector)
    if entry is not None:
        steps.append(entry)
    vint = ix.next("vring_interrupt", steps[-1].ts, before=limit, pid=guest_pid,
                   pred=lambda e: e.args.get("vq") == driver_vq)
    if vint is not None:
        steps.append(vint)
        done = ix.next("skb_xmit_done", vint.ts, before=vint.parent.end if vint.parent else limit,
                       pid=guest_pid, tid=vint.tid)
        if done is not None:
            steps.append(done)
    return steps


def _correlate(ix: _Index, send: Event, seq: int, msi_gsi: dict[int, int]) -> Packet | None:
    g_pid, g_tid = send.pid, send.tid
    xmit = ix.next("start_xmit", send.ts, pid=g_pid, tid=g_tid)
    add = ix.next("virtqueue_add_split", xmit.ts if xmit else send.ts, pid=g_pid, tid=g_tid,
                  pred=lambda e: _is_tx_driver(e.args.get("vq")))
    if add is None:
        return None
    head, avail_idx = add.args.get("head"), add.args.get("avail_idx")
    driver_vq = add.args.get("vq")
    is_dev_vq = _device_vq(str(driver_vq))
    pop = ix.next("virtqueue_pop", add.ts, role="qemu",
                  pred=lambda e: is_dev_vq(e.args.get("vq"))
                  and e.args.get("avail_idx") == avail_idx)
    steps: list[Event | None] = [xmit, add]
    steps += _kick_steps(ix, add, pop.ts if pop else None, is_dev_vq)
    if pop is not None:
        sent = ix.next("sosendto", pop.ts, role="qemu", pred=lambda e: e.args.get("seq") == seq)
        fill = ix.next("virtqueue_fill", (sent or pop).ts, pid=pop.pid, tid=pop.tid,
                       pred=lambda e: is_dev_vq(e.args.get("vq"))
                       and e.args.get("elem") == head)
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
            steps += _interrupt_steps(ix, vnotify, g_pid, driver_vq, limit, msi_gsi)
        steps.append(reclaim)
    return Packet(seq, send, _monotonic(steps), head, avail_idx)


def find_packets(trace: Trace) -> dict[int, Packet]:
    """Each datagram the guest sent (by sequence number) and its path through the processes."""
    ix = trace.index
    msi_gsi = {e.args.get("vector"): e.args.get("virq")
               for e in ix.all("kvm_irqchip_add_msi_route")}
    packets: dict[int, Packet] = {}
    for send in ix.all("udp_sendmsg"):
        seq = send.args.get("seq")
        if not isinstance(seq, int) or seq < 0 or seq in packets:
            continue
        p = _correlate(ix, send, seq, msi_gsi)
        if p is not None:
            packets[seq] = p
    return packets


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


def _flows(packets: dict[int, Packet]) -> dict[Event, list[dict[str, Any]]]:
    """Flow events per step event: ``s`` at the first step, ``t`` between, ``f`` at the last."""
    out: dict[Event, list[dict[str, Any]]] = {}
    for seq, p in packets.items():
        n = len(p.steps)
        if n < 2:
            continue
        for i, ev in enumerate(p.steps):
            ph = "s" if i == 0 else ("f" if i == n - 1 else "t")
            flow = {"ph": ph, "id": seq + 1, "cat": FLOW_CAT, "name": FLOW_NAME, "pid": ev.pid,
                    "tid": ev.tid, "ts": _us(ev.ts), "args": {"seq": seq, "step": ev.name}}
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
    """Write ``trace`` (with a flow per packet) as Chrome Trace Event JSON, one event a line."""
    flows = _flows(trace.packets)
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
    """Merge the processes' ``trace.<role>.msgpack`` dumps into Chrome Trace Event JSON."""
    trace = read_pieces(pieces)
    trace.packets = find_packets(trace)
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
    flow_points: dict[int, list[tuple[int, int, int, str, int]]] = {}
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
                flow_points.setdefault(int(d["id"]), []).append(
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
    trace.packets = _packets_from_flows(trace, flow_points) or find_packets(trace)
    return trace


def _packets_from_flows(trace: Trace, flow_points: dict[int, list[tuple]]) -> dict[int, Packet]:
    packets: dict[int, Packet] = {}
    sends = {e.args.get("seq"): e for e in reversed(trace.index.all("udp_sendmsg"))}
    for points in flow_points.values():
        steps: list[Event] = []
        for pid, tid, ts, step, _ in points:
            evs = trace.thread_events((pid, tid))
            i = _bisect_events(evs, ts)
            while i < len(evs) and evs[i].ts == ts:
                if evs[i].name == step and not evs[i].is_span:
                    steps.append(evs[i])
                    break
                i += 1
        seq = points[0][4]
        send = sends.get(seq)
        if send is not None and steps:
            add = next((e for e in steps if e.name == "virtqueue_add_split"), None)
            packets[seq] = Packet(seq, send, steps, add.args.get("head") if add else None,
                                  add.args.get("avail_idx") if add else None)
    return packets


def _bisect_events(evs: list[Event], ts: int) -> int:
    lo, hi = 0, len(evs)
    while lo < hi:
        mid = (lo + hi) // 2
        if evs[mid].ts < ts:
            lo = mid + 1
        else:
            hi = mid
    return lo


# -- one packet's call chain --------------------------------------------------------------------


def packet(trace: Trace, seq: int) -> Packet:
    p = trace.packets.get(seq)
    if p is None:
        known = sorted(trace.packets)
        have = f"{known[0]}..{known[-1]}" if known else "none"
        raise TraceError(f"no packet with seq {seq} in the trace (packets found: {have})")
    return p


def chain_events(trace: Trace, seq: int) -> tuple[list[Event], list[Event]]:
    """The events of packet ``seq``'s path, and the spans they ran inside of ("context").

    The path is made of units, each with everything that ran inside it: the guest's send
    (``udp_sendmsg``), and for each later step its outermost enclosing span that began after
    the previous step and ended with the send or the guest's completion handling at the
    latest (so a main loop iteration or a KVM_RUN that was already running, or ran on, is not
    part of it). Context spans are the units' enclosing
    spans that began earlier (``main_loop_wait``, ``kvm_arch_vcpu_ioctl_run``, ...).
    """
    p = packet(trace, seq)
    anchors = [p.send] + p.steps

    def unit(ev: Event, floor: int | None, ceiling: int | None) -> Event:
        u = ev
        for a in ev.ancestors():
            if (floor is not None and a.ts < floor) or (ceiling is not None and a.end > ceiling):
                break
            u = a
        return u

    first = unit(p.send, None, None)
    ceiling = max(first.end, unit(anchors[-1], anchors[-2].ts, None).end) \
        if len(anchors) > 1 else first.end
    units = [first] + [unit(ev, prev.ts, ceiling) for prev, ev in zip(anchors, anchors[1:],
                                                                      strict=False)]
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
    context: list[Event] = []
    seen: set[Event] = set()
    for ev in chain:
        for a in ev.ancestors():
            if a not in members and a not in seen:
                seen.add(a)
                context.append(a)
    context.sort(key=lambda e: (e.ts, e.order))
    return chain, context


def _steps(trace: Trace, events: list[Event], within: set[Event]) -> list[ChainStep]:
    return [ChainStep(ev.ts / 1000, ev.role, trace.thread_name(ev),
                      sum(1 for a in ev.ancestors() if a in within), ev.name, dict(ev.args),
                      ev.dur / 1000 if ev.dur is not None else None) for ev in events]


def packet_chain(trace: Trace | str | Path, seq: int) -> list[ChainStep]:
    """Packet ``seq``'s path from the guest's first event for it (``udp_sendmsg``) to the end of
    its completion handling: (ts, process, thread, depth, name, args), in time order, depth
    counting the enclosing spans that belong to the chain."""
    t = trace if isinstance(trace, Trace) else load_trace(trace)
    chain, _ = chain_events(t, seq)
    return _steps(t, chain, set(chain))


def packet_context(trace: Trace | str | Path, seq: int) -> list[ChainStep]:
    """The spans packet ``seq``'s chain ran inside of, that began before it."""
    t = trace if isinstance(trace, Trace) else load_trace(trace)
    _, context = chain_events(t, seq)
    return _steps(t, context, set(context))
