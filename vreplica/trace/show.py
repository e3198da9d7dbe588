"""vreplica trace show: one datagram's call chain through the three processes, as text.

Read from a merged trace: the chain to the host (guest driver -> KVM -> QEMU's virtio-net and
its backend -> the host socket, and the completion interrupt back) and, in an echo run, the
reply's chain back into the guest's socket. The demo prints its round trip with these.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from common.kvm_abi import KVM_EXIT_NAMES, KVM_IOCTL_NR
from common.trace import elem_head, vq_index
from vreplica.run.options import Parser
from vreplica.trace.tracefile import (
    TX,
    Event,
    Trace,
    TraceError,
    chain_events,
    load_trace,
    round_trip_events,
)

WHERE_W = 16
WIDTH = 100
"""The lines' width when the output is not a terminal (a terminal's own width otherwise)."""
MIN_WIDTH = 60

Detail = Callable[[dict[str, Any]], str]
IOCTL_NAMES = {nr: name for name, nr in KVM_IOCTL_NR.items()}


def width() -> int:
    """The terminal's width (COLUMNS, else the terminal's, else WIDTH)."""
    return max(MIN_WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns)


def fit(line: str, indent: int) -> list[str]:
    """``line`` within the width, broken only at spaces: the lines after the first start
    ``indent`` columns in; a number or a name longer than the width stays whole."""
    if len(line) <= width():
        return [line]
    return textwrap.wrap(line, width(), subsequent_indent=" " * indent,
                         break_long_words=False, break_on_hyphens=False)


def chain_line(when: str, mark: str, where: str, depth: int, name: str, detail: str) -> list[str]:
    """One call-chain line, ``{offset} {>>} {process thread} {indent}{name}  {detail}``; a
    detail too long for the width goes on below, under the name."""
    head = f"{when:>8} {mark} {where:<{WHERE_W}} {'  ' * depth}{name}"
    return fit(head + (f"  {detail}" if detail else ""), len(head) - len(name) + 2)


def _hex(v: Any) -> str:
    return f"{v:#x}" if isinstance(v, int) else str(v)


def _exit_name(a: dict[str, Any]) -> str:
    return KVM_EXIT_NAMES.get(a.get("reason"), str(a.get("reason")))


def _vq(a: dict[str, Any]) -> str:
    """QEMU's ``vq %p``, with the queue the replica's address stands for."""
    return f"vq {a.get('vq')} (queue {vq_index(a.get('vq'))})"


def _elem(a: dict[str, Any]) -> str:
    found = elem_head(a.get("elem"))
    return f"elem {a.get('elem')} (head {found[1] if found else '?'})"


SHOWN: dict[str, Detail] = {
    "udp_sendmsg": lambda a: f"seq {a.get('seq')}: {a.get('len')} B to 10.0.2.2:{a.get('dport')}",
    "start_xmit": lambda a: f"{a.get('dev')}: {a.get('len')}-byte frame for {a.get('vq')}",
    "xmit_skb": lambda a: "virtio-net header + frame",
    "virtqueue_add_split": lambda a: f"head {a.get('head')} into the avail ring, "
                                     f"avail_idx {a.get('avail_idx')}",
    "virtqueue_add_packed": lambda a: f"id {a.get('head')} at ring position {a.get('pos')}, "
                                      "its flags stored last",
    "vp_notify": lambda a: (f"iowrite16({a.get('index')}, port {_hex(a.get('port'))}): traps"
                            if a.get("addr") is None else
                            f"iowrite16({a.get('index')}, {_hex(a.get('addr'))}): an MMIO "
                            "store, traps"),
    "kvm_arch_vcpu_ioctl_run": lambda a: "KVM_RUN",
    "kvm_exit": lambda a: f"VM exit: {a.get('exit_reason')}",
    "handle_exit": lambda a: "",
    "kvm_pio": lambda a: f"pio_{'write' if a.get('rw') else 'read'} port {_hex(a.get('port'))} "
                         f"= {a.get('val')}",
    "kvm_mmio": lambda a: f"mmio_write gpa {_hex(a.get('gpa'))} = {a.get('val')}",
    "ioeventfd_write": lambda a: "address (and datamatch) match: signal the eventfd, re-enter "
                                 "the guest",
    "kvm_userspace_exit": lambda a: f"return to QEMU: {_exit_name(a)}",
    "kvm_cpu_exec": lambda a: "",
    "kvm_run_exit": lambda a: f"KVM_RUN returned {_exit_name(a)}",
    "kvm_handle_io": lambda a: "the BQL, then the port's region",
    "virtio_pci_notify_write": lambda a: "virtio-pci's modern notify region: queue = addr / 4",
    "address_space_rw": lambda a: "",
    "virtio_pci_config_write": lambda a: "virtio-pci's legacy I/O BAR",
    "virtio_ioport_write": lambda a: "",
    "main_loop_wait": lambda a: "",
    "virtio_queue_host_notifier_read": lambda a: "the ioeventfd is readable",
    "virtio_queue_notify": lambda a: f"n {a.get('n')}, {_vq(a)}",
    "virtio_net_handle_tx_bh": lambda a: "disable notifications, defer to the bh",
    "virtio_net_handle_tx_timer": lambda a: "arm the TX timer (x-txtimer), or flush now",
    "qemu_bh_schedule": lambda a: f"{a.get('bh')} -> aio_notify",
    "aio_bh_poll": lambda a: "",
    "virtio_net_tx_bh": lambda a: "",
    "virtio_net_tx_timer": lambda a: "",
    "virtio_net_flush_tx": lambda a: "",
    "virtqueue_pop": lambda a: f"{_vq(a)} {_elem(a)}",
    "qemu_sendv_packet_async": lambda a: "",
    "qemu_net_queue_send_iov": lambda a: "deliver, or queue",
    "nc_sendv_compat": lambda a: "one buffer for receive()",
    "net_slirp_receive": lambda a: "",
    "slirp_input": lambda a: f"{a.get('len')} B, ethertype {_hex(a.get('proto'))}",
    "sosendto": lambda a: f"host socket fd {a.get('fd')} -> 127.0.0.1:{a.get('dport')}",
    "virtqueue_fill": lambda a: f"{_elem(a)}, len {a.get('len')}",
    "virtqueue_flush": lambda a: f"used_idx += {a['count']}" if a.get("count") is not None
    else "packed: used flags written, the first descriptor's last",
    "virtio_notify": lambda a: f"{_vq(a)} -> interrupt",
    "kvm_vm_ioctl": lambda a: IOCTL_NAMES.get(a.get("type"), _hex(a.get("type"))),
    "kvm_msi_set_irq": lambda a: f"MSI to {_hex(a.get('address'))}, vector {a.get('data')}",
    "kvm_set_irq": lambda a: f"gsi {a.get('gsi')} level {a.get('level')} -> IOAPIC",
    "irqfd_wakeup": lambda a: f"gsi {a.get('gsi')} -> local APIC",
    "kvm_inj_virq": lambda a: f"inject vector {a.get('irq')} at VM entry",
    "vring_interrupt": lambda a: f"irq {a.get('irq')}, {a.get('vq')} used_idx {a.get('used_idx')}",
    "skb_xmit_done": lambda a: "schedule NAPI",
    "net_rx_action": lambda a: "softirq: run the scheduled NAPI polls",
    "virtnet_poll_tx": lambda a: "",
    "free_old_xmit_skbs": lambda a: f"{a.get('packets')} buffer(s) back to the guest",
    "slirp_pollfds_poll": lambda a: "a host socket is readable",
    "sorecvfrom": lambda a: f"seq {a.get('seq')}: {a.get('len')} B on host fd {a.get('fd')} "
                            f"from 127.0.0.1:{a.get('sport')}",
    "udp_output": lambda a: "UDP header, from 10.0.2.2",
    "ip_output": lambda a: "IPv4 header, to 10.0.2.15",
    "if_encap": lambda a: "Ethernet header (the guest's MAC, learnt by ARP)",
    "slirp_output": lambda a: f"{a.get('len')}-byte frame for the NIC",
    "qemu_send_packet": lambda a: "-> qemu_sendv_packet_async",
    "virtio_net_receive": lambda a: "virtio-net header + frame",
    "skb_recv_done": lambda a: "schedule NAPI",
    "virtnet_poll": lambda a: "",
    "virtnet_receive": lambda a: "",
    "virtqueue_get_buf": lambda a: f"{a.get('vq')} head {a.get('head')}, len {a.get('len')}",
    "receive_buf": lambda a: f"{a.get('len')}-byte frame",
    "netif_receive_skb": lambda a: "-> ip_rcv",
    "ip_rcv": lambda a: "",
    "udp_rcv": lambda a: f"seq {a.get('seq')}: onto port {a.get('dport')}'s receive queue",
    "recvfrom": lambda a: f"seq {a.get('seq')}: {a.get('len')} B returned to the program",
}
EMPTY_UNLESS_TRACED = {"virtqueue_pop": "virtqueue_pop",
                       "slirp_pollfds_poll": "sorecvfrom",
                       "free_old_xmit_skbs": "free_old_xmit_skbs",
                       "virtio_net_flush_tx": "virtqueue_pop",
                       "virtqueue_get_buf": "virtqueue_get_buf"}
"""Spans shown only if the trace point named here ran inside them (a pop that found the ring
empty, a flush that popped nothing, a slirp poll that read no datagram)."""
TX_HIDDEN = {"xmit_skb", "handle_exit", "net_rx_action", "virtqueue_get_buf"}
"""Steps the way to the host leaves out, for room: a line above or below tells of each."""
RX_HIDDEN = {"qemu_sendv_packet_async", "ip_rcv"}
"""The same for the way back, which also leaves out the spans already running (the main
loop's iteration, KVM_RUN): the thread names tell where each line ran."""


def _shown(chain: list[Event], context: list[Event],
           hidden: set[str] | frozenset[str] = frozenset()) -> list[tuple[Event, dict[str, Any]]]:
    """The events the demo prints, each with its arguments (a span takes those of the trace
    point of its own name inside it); spans that found nothing (an empty pop) and ``hidden``
    names are left out, and a span that was already running comes just before the first line
    inside it (unless its own trace point, in the chain, stands for it)."""
    in_chain = set(chain)
    inner: dict[Event, dict[str, Any]] = {}
    worked: set[Event] = set()
    for ev in chain:
        if not ev.is_span and ev.parent is not None and ev.parent.name == ev.name:
            inner[ev.parent] = ev.args
        if not ev.is_span:
            worked.update(a for a in ev.ancestors() if EMPTY_UNLESS_TRACED.get(a.name) == ev.name)
    out: list[tuple[Event, dict[str, Any]]] = []
    pending = [c for c in context if c.name in SHOWN and c not in inner]
    for ev in chain:
        folded = not ev.is_span and ev.parent in in_chain and ev.parent.name == ev.name
        if ev.name not in SHOWN or ev.name in hidden or folded:
            continue
        if ev.is_span and ev.name in EMPTY_UNLESS_TRACED and ev not in worked:
            continue
        for c in [c for c in pending if any(a is c for a in ev.ancestors())]:
            pending.remove(c)
            out.append((c, c.args))
        out.append((ev, {**inner.get(ev, {}), **ev.args}))
    return out


def _section(trace: Trace, chain: list[Event], context: list[Event], t0: int,
             hidden: set[str]) -> list[str]:
    """One direction's lines: offset, process/thread, the function at its call depth."""
    shown = _shown(chain, context, hidden)
    on_screen = {ev for ev, _ in shown}
    context_set = set(context)
    lines = []
    prev_role = shown[0][0].role if shown else ""
    for ev, args in shown:
        depth = sum(1 for a in ev.ancestors() if a in on_screen)
        where = f"{ev.role} {trace.thread_name(ev)}"[:WHERE_W]
        if ev in context_set:
            when = "..."
            detail = (f"already running, since {(t0 - ev.ts) / 1e6:.1f} ms before the send"
                      if ev.ts < t0 else f"started {(ev.ts - t0) / 1000:.1f} us after the send")
        else:
            when = f"{(ev.ts - t0) / 1000:.1f}"
            detail = SHOWN[ev.name](args)
        mark = ">>" if ev.role != prev_role else "  "
        prev_role = ev.role
        lines += chain_line(when, mark, where, depth, ev.name, detail)
    return lines


def _point(events: list[Event], name: str) -> Event | None:
    return next((e for e in events if e.name == name and not e.is_span), None)


LEGEND = ["legend: us = microseconds since the guest's udp_sendmsg; indent = call depth;",
          "        >> = control passes to another process; ... = was already running",
          f"{'us':>8}    {'process/thread':<{WHERE_W}} function"]


def legend() -> list[str]:
    """LEGEND within the width."""
    return [part for line in LEGEND for part in fit(line, 8)]


def format_round_trip(trace: Trace, seq: int) -> list[str]:
    """Round trip ``seq``: the datagram's chain to the host, then its reply's back to the
    guest socket, each line with its offset from the guest's ``udp_sendmsg``."""
    (tx, tx_context), (rx, _) = round_trip_events(trace, seq)
    t0 = tx[0].ts
    send = _point(tx, "udp_sendmsg")
    port = send.args.get("dport") if send is not None else "?"
    sent, read = _point(tx, "sosendto"), _point(rx, "sorecvfrom")
    got = _point(rx, "recvfrom")
    lines = [
        *fit(f"One round trip (seq {seq}) through the three processes: to the host's echo "
             "service and back.", 2),
        *legend(),
        *fit(f"-> to the host: seq {seq} to 10.0.2.2:{port}, which slirp sends to "
             f"127.0.0.1:{port}", 3),
    ]
    lines += _section(trace, tx, tx_context, t0, TX_HIDDEN)
    overlap = rx and rx[0].ts < max(ev.end for ev in tx)
    lines += fit("<- back to the guest: the echo service's reply"
                 + (" (under way while the guest still completed the send)" if overlap else ""),
                 3)
    lines += _section(trace, rx, [], t0, RX_HIDDEN)
    if got is not None:
        host = (f" ({(read.ts - sent.ts) / 1000:.0f} us of it on the host, sosendto to "
                "sorecvfrom)" if sent is not None and read is not None else "")
        lines += fit(f"round trip: {(got.ts - t0) / 1000:.0f} us, udp_sendmsg to "
                     f"recvfrom{host}", 0)
    return lines


KICK_HINT = ("the kick went by KVM's ioeventfd; ./run.sh demo --ioeventfd off sends it through "
             "kvm_cpu_exec")
"""The default demo's pointer to the path a kick takes without ioeventfd: QEMU's vCPU thread
(kvm_cpu_exec -> kvm_handle_io -> address_space_rw -> ... -> virtio_queue_notify)."""

def format_packet(trace: Trace, seq: int) -> list[str]:
    """Datagram ``seq``'s chain as the demo prints it: its round trip if the trace holds its
    reply (an echo run), else its way to the host and the completion back."""
    if seq in trace.packets and seq in trace.replies:
        return format_round_trip(trace, seq)
    tx, context = chain_events(trace, seq, TX)
    send = _point(tx, "udp_sendmsg")
    port = send.args.get("dport") if send is not None else "?"
    return [f"Datagram seq {seq} through the three processes, to 10.0.2.2:{port}.", *legend(),
            "-> to the host", *_section(trace, tx, context, tx[0].ts, TX_HIDDEN)]


WHOLE_RX = ("kvm_msi_set_irq", "kvm_inj_virq", "vring_interrupt", "recvfrom")
"""A reply that took the whole way: its own interrupt through KVM, up to the socket."""


# -- over a tap: by time, each round trip travels alone ------------------------------------------

TAP_SHOWN: dict[str, Detail] = {
    **{k: SHOWN[k] for k in ("udp_sendmsg", "start_xmit", "vp_notify", "kvm_exit", "kvm_pio",
                             "kvm_mmio",
                             "ioeventfd_write", "virtio_queue_host_notifier_read",
                             "virtio_queue_notify", "virtio_net_handle_tx_bh", "virtio_net_tx_bh",
                             "virtqueue_pop", "virtqueue_flush", "virtio_notify", "irqfd_wakeup",
                             "kvm_inj_virq", "vring_interrupt", "skb_xmit_done",
                             "free_old_xmit_skbs", "virtio_net_receive", "skb_recv_done",
                             "receive_buf", "udp_rcv", "recvfrom")},
    "virtqueue_add_outbuf": lambda a: "virtio-net header (NEEDS_CSUM) + frame into the ring",
    "vhost_poll_wakeup": lambda a: f"{a.get('work')}: queue the work, wake the worker",
    "handle_tx": lambda a: f"avail_idx {a.get('avail_idx')}, last_avail_idx "
                           f"{a.get('last_avail_idx')}",
    "handle_rx": lambda a: f"a {a.get('len')}-byte frame waits on the tap",
    "vhost_get_vq_desc": lambda a: "the chain in guest RAM, as iovecs",
    "tun_sendmsg": lambda a: f"{a.get('len')} B (vnet header + frame) into the tap",
    "tun_recvmsg": lambda a: f"{a.get('len')} B from the tap into {a.get('heads')} guest "
                             "buffer(s)",
    "vhost_add_used_n": lambda a: "used ring entries, then used->idx",
    "vhost_signal": lambda a: f"vq {a.get('vq')} used_idx {a.get('used_idx')} -> the call "
                              "eventfd (irqfd)",
    "tap_receive_iov": lambda a: "writev: vnet header + frame into the tap",
    "tap_send": lambda a: "the tap is readable",
}


def format_tap_round_trip(trace: Trace, seq: int, echo: tuple[int, int] | None) -> list[str]:
    """Round trip ``seq`` over the tap: every shown event between the guest's udp_sendmsg
    and its recvfrom, or its TX interrupt if that comes later (the demo paces the datagrams,
    so nothing else is under way), with the
    host echo socket's receive and reply from its own clock (CLOCK_MONOTONIC, as the
    trace's)."""
    send = next((e for e in trace.events if e.name == "udp_sendmsg" and not e.is_span
                 and e.args.get("seq") == seq), None)
    got = next((e for e in trace.events if e.name == "recvfrom" and not e.is_span
                and e.args.get("seq") == seq), None)
    if send is None or got is None:
        raise TraceError(f"seq {seq}: no udp_sendmsg and recvfrom in the trace")
    t0 = send.parent.ts if send.parent is not None and send.parent.name == send.name \
        else send.ts
    # the TX completion's interrupt may come after the reply's: follow it until the next send
    next_send = min((e.ts for e in trace.events if e.name == "udp_sendmsg" and not e.is_span
                     and e.ts > send.ts and e.args.get("seq") != seq), default=None)
    done = next((e.ts for e in trace.events if e.name == "skb_xmit_done" and e.ts > t0
                 and (next_send is None or e.ts < next_send)), 0)
    window = [e for e in trace.events
              if t0 <= e.ts <= max(got.ts, done) and e.name in TAP_SHOWN]
    args: dict[Event, dict[str, Any]] = {}
    for e in window:  # a span's own trace point lends it its arguments and is not shown
        if not e.is_span and e.parent is not None and e.parent.name == e.name:
            args[e.parent] = e.args
    window = [e for e in window
              if (e.is_span or e.parent is None or e.parent.name != e.name)
              and not (e.is_span and EMPTY_UNLESS_TRACED.get(e.name) == e.name
                       and e not in args)]  # a pop that found nothing
    on_screen = set(window)
    lines = [*fit(f"One round trip (seq {seq}) over the tap: the guest's driver, KVM's "
                  "ioeventfd, the device, the tap, the host's stack and echo socket, and back.",
                  2),
             *fit("legend: us = microseconds since the guest's udp_sendmsg; indent = call "
                  "depth;", 8),
             *fit("        >> = control passes to another process or thread", 8),
             f"{'us':>8}    {'process/thread':<{WHERE_W}} function"]
    host = []
    if echo is not None:
        host = [(echo[0], "host: the echo socket at 10.0.2.2 has it (the kernel's UDP stack, "
                          "from the tap) and sends it back")]
    merged = sorted([(e.ts, e) for e in window] + [(ts, text) for ts, text in host],
                    key=lambda x: x[0])
    prev = ""
    for ts, item in merged:
        if isinstance(item, str):
            lines += chain_line(f"{(ts - t0) / 1000:.1f}", ">>", "host", 0, item, "")
            prev = "host"
            continue
        ev = item
        where = f"{ev.role} {trace.thread_name(ev)}"[:WHERE_W]
        depth = sum(1 for a in ev.ancestors() if a in on_screen)
        mark = ">>" if where != prev else "  "
        prev = where
        detail = TAP_SHOWN[ev.name]({**args.get(ev, {}), **ev.args})
        lines += chain_line(f"{(ts - t0) / 1000:.1f}", mark, where, depth, ev.name, detail)
    lines += fit(f"round trip: {(got.ts - t0) / 1000:.0f} us, udp_sendmsg to recvfrom", 0)
    return lines


def pick_round_trip(trace: Trace, wanted: int | None) -> tuple[int, str]:
    """The round trip to follow, and why that one: ``wanted``, or the median round trip of
    those that took the whole way (an interrupt of their own each way), leaving out the
    first datagram, which waited for ARP."""
    if wanted is not None:
        return wanted, f"seq {wanted}, as --packet asked"

    def whole(seq: int) -> bool:
        tx, rx = trace.packets[seq].steps, trace.replies[seq].steps
        return any(e.name == "vring_interrupt" for e in tx) and \
            [e.name for e in rx if e.name in WHOLE_RX] == list(WHOLE_RX)

    def rtt(seq: int) -> int:
        return trace.replies[seq].steps[-1].ts - trace.packets[seq].send.ts

    both = sorted(set(trace.packets) & set(trace.replies))
    whole_way = [seq for seq in both if whole(seq)]
    seqs = whole_way or both
    if not seqs:
        raise TraceError("the trace holds no round trip (no datagram with its reply)")
    arp = len(seqs) > 1 and seqs[0] == both[0]
    if arp:
        seqs = seqs[1:]  # the first one sent waits for ARP
    seq = sorted(seqs, key=rtt)[len(seqs) // 2]  # a typical one: the median round trip
    among = ", ".join(map(str, seqs))
    why = (f"seq {seq}: the median round trip ({rtt(seq) / 1000:.0f} us) of seqs {among}"
           + (", those that took the whole way (an interrupt of their own each way)"
              if whole_way else "")
           + (f"; seq {both[0]} waited for ARP" if arp else "")
           + " (--packet SEQ follows another)")
    return seq, why


def _pick_any(trace: Trace, wanted: int | None) -> int:
    """``wanted``, or the round trip the demo would pick, or (no replies) the median datagram."""
    if wanted is not None or set(trace.packets) & set(trace.replies):
        return pick_round_trip(trace, wanted)[0]
    if not trace.packets:
        raise TraceError("no packet paths in this trace")
    seqs = sorted(trace.packets)
    return seqs[len(seqs) // 2]


def show_main(argv: list[str]) -> int:
    """``vreplica trace show TRACE.json [--packet SEQ]``: a datagram's chain from a trace file,
    printed as the demo prints it."""
    p = Parser(prog="vreplica trace show", label="vreplica trace show",
               description="Print one datagram's call chain through the three processes (an "
                           "echo run: its round trip) from a trace file, as the demo does.")
    p.add_argument("trace", metavar="TRACE.json", help="a trace written by run --trace or demo")
    p.add_argument("--packet", type=int, default=None, metavar="SEQ",
                   help="the datagram's sequence number (default: the demo's pick)")
    a = p.parse_args(argv)
    try:
        trace = load_trace(a.trace)
        lines = format_packet(trace, _pick_any(trace, a.packet))
    except TraceError as e:
        print(f"vreplica trace show: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
