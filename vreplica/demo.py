"""vreplica demo: what ``./run.sh`` shows a new user.

The guest sends a few UDP datagrams to a listener this command opens on 127.0.0.1, paced so
that each one travels alone; then one datagram's journey is printed as the call chain the
three processes ran (guest driver -> KVM -> QEMU's virtio-net and slirp -> the host socket,
and the completion interrupt back), with the run's summary and the files to look at next:
the Chrome trace (Perfetto), the pcap, and a swimlane picture of that datagram.

Not part of the replicated system: a guided tour of it.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vreplica.cli import Parser, execute
from vreplica.render import RenderError, render_packet
from vreplica.summary import format_summary
from vreplica.supervisor import RunFailed, RunOptions
from vreplica.tracefile import Event, Trace, TraceError, chain_events, load_trace

PACKETS = 5
SIZE = 64
PACE_MS = 20.0
WHERE_W = 16
WIDTH = 98

Detail = Callable[[dict[str, Any]], str]


def _hex(v: Any) -> str:
    return f"{v:#x}" if isinstance(v, int) else str(v)


SHOWN: dict[str, Detail] = {
    "udp_sendmsg": lambda a: f"seq {a.get('seq')}: {a.get('len')} B to 10.0.2.2:{a.get('dport')}",
    "start_xmit": lambda a: f"{a.get('dev')}: {a.get('len')}-byte frame for {a.get('vq')}",
    "xmit_skb": lambda a: "virtio-net header + frame",
    "virtqueue_add_split": lambda a: f"head {a.get('head')} into the avail ring, "
                                     f"avail_idx {a.get('avail_idx')}",
    "vp_notify": lambda a: f"iowrite16({a.get('index')}, port {_hex(a.get('port'))}): traps",
    "kvm_arch_vcpu_ioctl_run": lambda a: "KVM_RUN",
    "kvm_exit": lambda a: f"VM exit: {a.get('reason')}",
    "handle_exit": lambda a: "",
    "kvm_pio": lambda a: f"{a.get('rw')} port {_hex(a.get('port'))} = {a.get('val')}",
    "ioeventfd_write": lambda a: "datamatch: signal the eventfd, re-enter the guest",
    "kvm_userspace_exit": lambda a: f"return to QEMU: {a.get('reason')}",
    "kvm_cpu_exec": lambda a: "",
    "kvm_run_exit": lambda a: f"KVM_RUN returned {a.get('name')}",
    "kvm_handle_io": lambda a: "",
    "virtio_ioport_write": lambda a: "",
    "main_loop_wait": lambda a: "",
    "virtio_queue_host_notifier_read": lambda a: "the ioeventfd is readable",
    "virtio_queue_notify": lambda a: f"{a.get('vq')}",
    "virtio_net_handle_tx_bh": lambda a: "disable notifications, defer to the bh",
    "qemu_bh_schedule": lambda a: f"{a.get('bh')} -> aio_notify",
    "aio_bh_poll": lambda a: "",
    "virtio_net_tx_bh": lambda a: "",
    "virtio_net_tx_timer": lambda a: "",
    "virtio_net_flush_tx": lambda a: f"{a.get('len')}-byte frame" if "len" in a else "",
    "virtqueue_pop": lambda a: f"{a.get('vq')} head {a.get('elem')} "
                               f"(avail_idx {a.get('avail_idx')})",
    "qemu_sendv_packet_async": lambda a: "",
    "qemu_net_queue_send_iov": lambda a: f"to netdev {a.get('to')}",
    "nc_sendv_compat": lambda a: f"{a.get('len')} B",
    "net_slirp_receive": lambda a: "",
    "slirp_input": lambda a: f"{a.get('len')} B, ethertype {_hex(a.get('proto'))}",
    "sosendto": lambda a: f"host socket fd {a.get('fd')} -> 127.0.0.1:{a.get('dport')}",
    "virtqueue_fill": lambda a: f"{a.get('vq')} head {a.get('elem')}, len {a.get('len')}",
    "virtqueue_flush": lambda a: f"used_idx += {a.get('count')}",
    "virtio_notify": lambda a: f"{a.get('vq')} used_idx {a.get('used_idx')} -> irqfd",
    "irqfd_wakeup": lambda a: f"gsi {a.get('gsi')} -> local APIC",
    "kvm_inj_virq": lambda a: f"inject vector {','.join(map(str, a.get('vectors') or []))} "
                              "at VM entry",
    "vring_interrupt": lambda a: f"irq {a.get('irq')}, {a.get('vq')} used_idx {a.get('used_idx')}",
    "skb_xmit_done": lambda a: "schedule NAPI",
    "virtnet_poll_tx": lambda a: "",
    "free_old_xmit_skbs": lambda a: f"{a.get('packets')} buffer(s) back to the guest",
}
EMPTY_UNLESS_TRACED = {"virtqueue_pop", "free_old_xmit_skbs", "virtio_net_flush_tx"}


def _shown(chain: list[Event], context: list[Event]) -> list[tuple[Event, dict[str, Any]]]:
    """The events the demo prints, each with its arguments (a span takes those of the trace
    point of its own name inside it); spans that found nothing (an empty pop) are left out,
    and a span that was already running comes just before the first line inside it."""
    inner: dict[Event, dict[str, Any]] = {}
    for ev in chain:
        if not ev.is_span and ev.parent is not None and ev.parent.name == ev.name:
            inner[ev.parent] = ev.args
    out: list[tuple[Event, dict[str, Any]]] = []
    pending = [c for c in context if c.name in SHOWN]
    for ev in chain:
        if ev.name not in SHOWN or (not ev.is_span and ev.parent is not None
                                    and ev.parent.name == ev.name):
            continue
        if ev.is_span and ev.name in EMPTY_UNLESS_TRACED and ev not in inner:
            continue
        for c in [c for c in pending if any(a is c for a in ev.ancestors())]:
            pending.remove(c)
            out.append((c, c.args))
        out.append((ev, {**inner.get(ev, {}), **ev.args}))
    return out


def format_chain(trace: Trace, seq: int) -> list[str]:
    """Packet ``seq``'s journey: one line per function, offset, process/thread, call depth."""
    chain, context = chain_events(trace, seq)
    shown = _shown(chain, context)
    on_screen = {ev for ev, _ in shown}
    context_set = set(context)
    t0 = chain[0].ts
    lines = [
        f"One datagram (seq {seq}) from the guest's UDP socket to the host's, as the three "
        "processes ran it.",
        "legend: us = microseconds since the guest's udp_sendmsg; indent = call depth;",
        "        >> = control passes to another process; ... = was already running",
        f"{'us':>8}    {'process/thread':<{WHERE_W}} function",
    ]
    prev_role = chain[0].role
    for ev, args in shown:
        depth = sum(1 for a in ev.ancestors() if a in on_screen)
        where = f"{ev.role} {trace.thread_name(ev)}"[:WHERE_W]
        if ev in context_set:
            when = "..."
            detail = (f"running since {(ev.ts - t0) / 1e6:+.1f} ms" if ev.ts < t0 else
                      f"running since +{(ev.ts - t0) / 1000:.1f} us")
        else:
            when = f"{(ev.ts - t0) / 1000:.1f}"
            detail = SHOWN[ev.name](args)
        mark = ">>" if ev.role != prev_role else "  "
        prev_role = ev.role
        text = f"{'  ' * depth}{ev.name}"
        lines.append(f"{when:>8} {mark} {where:<{WHERE_W}} {text}"
                     + (f"  {detail}" if detail else ""))
    p = trace.packets[seq]
    sent = next((e for e in p.steps if e.name == "sosendto"), None)
    done = max(ev.end for ev in chain)
    if sent is not None:
        lines.append(f"the datagram left for the host socket at +{(sent.ts - t0) / 1000:.0f} us;"
                     f" the guest had its buffer back at +{(done - t0) / 1000:.0f} us")
    return lines


def _pick(trace: Trace, wanted: int | None) -> int:
    if wanted is not None:
        return wanted
    whole = sorted(seq for seq, p in trace.packets.items()
                   if any(e.name == "vring_interrupt" for e in p.steps))
    seqs = whole or sorted(trace.packets)
    if not seqs:
        raise TraceError("the trace holds no packet path")
    return seqs[len(seqs) // 2]


def _parser() -> Parser:
    p = Parser(prog="vreplica demo",
               description="Send a few datagrams from the guest and follow one of them.")
    p.add_argument("--out", default="out", help="directory for the trace, pcap and picture")
    p.add_argument("--packets", type=int, default=PACKETS, help="datagrams to send (1..100)")
    p.add_argument("--pace-ms", type=float, default=PACE_MS,
                   help="pause between datagrams, so that each travels alone")
    p.add_argument("--packet", type=int, default=None, metavar="SEQ",
                   help="the datagram to follow (default: the middle one)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if not 1 <= a.packets <= 100 or a.pace_ms < 0:
        print("vreplica demo: --packets must be 1..100 and --pace-ms >= 0", file=sys.stderr)
        return 2
    if a.packet is not None and not 0 <= a.packet < a.packets:
        print(f"vreplica demo: --packet must be a sequence number sent, 0..{a.packets - 1}",
              file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"vreplica demo: cannot make {a.out}: {e.strerror}", file=sys.stderr)
        return 2
    trace_path, pcap_path = out / "trace.json", out / "tx.pcap"
    opts = RunOptions(mode="tx", packets=a.packets, size=SIZE, dest_port=0,
                      pace_ms=a.pace_ms, trace=str(trace_path), pcap=str(pcap_path),
                      timeout=60.0)
    try:
        summary, _ = execute(opts)  # it opens the host listener on 127.0.0.1 itself
    except RunFailed as e:
        print(f"vreplica demo: {e}", file=sys.stderr)
        return e.code
    host = summary.get("host", {"received": 0, "bad_payloads": 0})
    try:
        trace = load_trace(trace_path)
        seq = _pick(trace, a.packet)
        lines = format_chain(trace, seq)
        picture = render_packet(trace, seq, out / f"packet-{seq}.svg")
    except (TraceError, RenderError) as e:
        print(f"vreplica demo: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print()
    for line in format_summary(summary).splitlines():
        print("\n".join(textwrap.wrap(line, WIDTH, subsequent_indent=" " * 25,
                                       break_on_hyphens=False)))
    landed = host["received"] == a.packets and host["bad_payloads"] == 0
    print(f"  host listener          127.0.0.1:{opts.dest_port} got {host['received']} of "
          f"{a.packets} datagrams" + (", payloads intact" if landed else
                                      f", {host['bad_payloads']} damaged: NOT all landed"))
    print()
    cwd = Path.cwd()
    where = out.relative_to(cwd) if out.is_relative_to(cwd) else out
    print(f"files in {where}/:")
    print(f"  {trace_path.name:<14} Chrome trace JSON: open https://ui.perfetto.dev, "
          "\"Open trace file\"")
    print(f"  {pcap_path.name:<14} every frame on the NIC (wireshark, tshark -r)")
    print(f"  {picture.name:<14} seq {seq}'s journey as a swimlane picture (open in a browser)")
    return 0 if landed else 1


if __name__ == "__main__":
    sys.exit(main())
