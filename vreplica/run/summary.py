"""The run's summary: what each process reported, folded into the figures a user reads."""

from __future__ import annotations

from typing import Any


def _sum_dicts(items: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in items:
        for key, value in d.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
    return out


def _program_figures(summary: dict[str, Any], opts: Any, prog: dict[str, Any]) -> None:
    """What the guest program of an echo, sink or ping run counted, and where ``delivered``
    is counted then."""
    if opts.mode == "echo":
        summary.update({k: prog.get(k) for k in ("replies", "bad_replies", "duplicate_replies",
                                                 "rtt_us_p50", "rtt_us_p99", "rtt_us_max")})
        summary["delivered"] = prog.get("replies")
        summary["delivered_counted_by"] = "guest socket (replies)"
    elif opts.mode == "sink":
        summary.update({"arrived": prog.get("received"), "unique": prog.get("unique"),
                        "duplicates": prog.get("duplicates"), "in_order": prog.get("in_order")})
        summary["sent"] = opts.packets
        summary["sender"] = "host"
        rx_s = prog.get("receive_ns", 0) / 1e9
        summary["receive_s"] = round(rx_s, 6)
        # datagrams after the first, over the time from the first's arrival to the last's
        summary["host_rate_pps"] = round((prog.get("received", 0) - 1) / rx_s, 1) if rx_s \
            else None
        summary["delivered"] = prog.get("received")
        summary["delivered_counted_by"] = "guest socket"
    elif opts.mode == "ping":
        summary.update({"replies": prog.get("replies"), "rtt_us_p50": prog.get("rtt_us_p50"),
                        "rtt_us_p99": prog.get("rtt_us_p99")})
        summary["delivered"] = prog.get("replies")
        summary["delivered_counted_by"] = "ICMP echo replies"


def vhost_user_summary(g: dict[str, Any], q: dict[str, Any],
                       reports: dict[str, Any]) -> dict[str, Any]:
    """QEMU's vhost-user state, the back end's report, and the frames each way per queue
    pair as the guest's driver counted them."""
    return {"qemu": q["vhost_user"], "vhost": q.get("vhost"),
            "guest_features": q.get("guest_features"),
            "guest_tx_frames": [x.get("packets", 0) for x in g.get("sq") or []],
            "guest_rx_frames": [x.get("packets", 0) for x in g.get("rq") or []],
            "backend": reports.get("vhost-user")}


def _vhost_user_figures(summary: dict[str, Any], vu: dict[str, Any]) -> None:
    """The vhost-user state; the interrupts came from the back end's calls, not from QEMU."""
    summary["vhost_user"] = vu
    if vu["backend"]:
        pairs = vu["backend"].get("queues", [])
        summary["tx_interrupts"] = sum(p.get("tx_calls", 0) for p in pairs)
        summary["rx_interrupts"] = sum(p.get("rx_calls", 0) for p in pairs)


def build_summary(rid: str, opts: Any, reports: dict[str, Any], sink: dict | None,
                  elapsed_s: float) -> dict[str, Any]:
    g = reports.get("guest", {})
    k = reports.get("kvm", {})
    q = reports.get("qemu", {})
    prog = g.get("program", {})
    sent = prog.get("sent", 0)
    send_s = prog.get("send_ns", 0) / 1e9
    sq = _sum_dicts(g.get("sq") or [{}])
    rq = _sum_dicts(g.get("rq") or [{}])
    vcpu = k.get("vcpu", {})
    queues = q.get("queues", {})
    tx_q = _sum_dicts([v for name, v in queues.items() if name.startswith("TX")] or [{}])
    rx_q = _sum_dicts([v for name, v in queues.items() if name.startswith("RX")] or [{}])
    by_monitor = g.get("sent_by_monitor", 0)
    sent += by_monitor
    irqs = g.get("irqs", {})
    summary: dict[str, Any] = {
        "run": rid,
        "mode": opts.mode,
        "packets": opts.packets,
        "size": opts.size,
        "ioeventfd": opts.ioeventfd,
        "event_idx": opts.event_idx,
        "interrupt_mode": g.get("interrupt_mode"),
        "transport": opts.extra.get("transport", "legacy"),
        "driver_transport": g.get("transport"),
        "ring": g.get("ring", "split"),
        "queue_pairs": g.get("queue_pairs", 1),
        "queue_pairs_max": len(g.get("sq") or [{}]),
        "sent": sent,
        "sent_by_monitor": by_monitor,
        "sender": "guest",
        "delivered": sink["received"] if sink is not None else
        q.get("slirp", {}).get("stats", {}).get("udp_sent"),
        "delivered_counted_by": "host socket" if sink is not None else "slirp sendto",
        "kicks": sq.get("kicks", 0),
        "kicks_handled": tx_q.get("kicks_handled", 0),
        "kicks_coalesced": tx_q.get("kicks_coalesced", 0),
        "tx_interrupts": tx_q.get("notifies", 0),
        "rx_interrupts": rx_q.get("notifies", 0),
        "interrupts_injected": vcpu.get("irq_injections", 0),
        "interrupts_taken": {
            "TX": sum(n for name, n in irqs.items() if "output" in name),
            "RX": sum(n for name, n in irqs.items() if "input" in name),
            "config": sum(n for name, n in irqs.items() if name.endswith("-config")),
            "shared": sum(n for name, n in irqs.items()
                          if "virtqueues" in name or name.startswith("virtio") and "-" not in name),
            "timer": g.get("timer_interrupts", 0)},
        "ioeventfd_starts": (1 + g.get("resets", 0)) if opts.ioeventfd else 0,
        "exits": vcpu,
        "userspace_exits": {r: n for r, n in k.get("userspace_exits", {}).items() if n},
        "guest_irqs": g.get("irqs", {}),
        "elapsed_s": round(elapsed_s, 4),
        "send_s": round(send_s, 6),
        "packets_per_second": round(sent / send_s, 1) if send_s > 0 else None,
        "device_errors": q.get("errors", []),
    }
    if sink is not None:
        summary["host"] = sink
    _program_figures(summary, opts, prog)
    nq = q.get("netqueue", {})
    summary["rx_queued"] = nq.get("nic_queued", 0)
    summary["rx_dropped"] = nq.get("nic_dropped", 0)
    summary["rx_no_buffer"] = q.get("virtio_net", {}).get("rx_no_buffer", 0)
    summary["received_by_guest"] = rq.get("packets", 0)
    if "vhost_user" in q:
        _vhost_user_figures(summary, vhost_user_summary(g, q, reports))
    if "tap" in q:
        summary["tap"] = q["tap"]
        summary["async_tx_parks"] = q.get("virtio_net", {}).get("async_tx_parks", 0)
        summary["guest_csum"] = {k: g.get("stack", {}).get(k, 0)
                                 for k in ("csum_offloaded", "csum_errors")}
        if "vhost" in q:  # the interrupts came from the vhost worker, not from QEMU
            kv = k.get("vhost", {})
            devs = kv.get("open", []) + kv.get("released", [])
            vqs = [v for d in devs for v in d["vqs"]]
            summary["vhost"] = {"qemu": q["vhost"], "kernel": devs}
            summary["tx_interrupts"] = sum(v["signals"] for v in vqs if v["index"] == 1)
            summary["rx_interrupts"] = sum(v["signals"] for v in vqs if v["index"] == 0)
    else:
        summary["slirp"] = q.get("slirp", {}).get("stats", {})
    cpr = q.get("cpr", {})
    if cpr.get("enabled"):  # --reconnect: TX chains in flight when a QEMU died, sent again
        summary["resubmitted"] = cpr.get("resubmitted", 0)
        summary["incomings"] = cpr.get("incomings", [])
    summary["guest_resets"] = g.get("resets", 0)
    pci = q.get("virtio_pci", {})
    summary["ioeventfds"] = len(pci.get("ioeventfds", {}))  # registered at the end of the run
    summary["irqfds"] = len(pci.get("irqfds", {}))
    summary["indirect_descs"] = sq.get("indirect", 0)
    if g.get("fault"):
        summary["guest_fault"] = g["fault"]
    if sent:
        summary["kicks_per_packet"] = round(summary["kicks"] / sent, 4)
        summary["tx_interrupts_per_packet"] = round(summary["tx_interrupts"] / sent, 4)
    return summary


def vhost_kicks(s: dict[str, Any]) -> int:
    return sum(v["kicks"] for d in s["vhost"]["kernel"] for v in d["vqs"])


def sent_line(s: dict[str, Any]) -> str:
    if s["sender"] == "host":
        rate = f" (arriving at {s['host_rate_pps']:,.0f} pkt/s)" if s.get("host_rate_pps") else ""
        return f"  sent by the host       {s['sent']}{rate}"
    extra = f" ({s['sent_by_monitor']} by the monitor's send)" if s["sent_by_monitor"] else ""
    return f"  sent by the guest      {s['sent']}{extra}"


def kicks_line(s: dict[str, Any]) -> str:
    """Driver kicks against the handler runs they caused, and why the two differ: with
    ioeventfd QEMU kicks each TX queue itself once when it starts the ioeventfd (a kick
    the driver made meanwhile is not lost), and kicks that reach the eventfd before QEMU
    reads it are one read, one handler run."""
    kicks, handled = s["kicks"], s["kicks_handled"]
    restarts = s.get("device_restarts")
    if restarts:
        return (f"  kicks (driver)         {kicks}   handled by the last QEMU: {handled} "
                f"(QEMU restarted {restarts} time(s); each new one counts from its start)")
    line = f"  kicks (driver)         {kicks}   handled by QEMU: {handled}"
    if not s["ioeventfd"] or "vhost" in s:
        return line  # vhost's worker takes the kicks
    own = s["ioeventfd_starts"] * s["queue_pairs_max"]
    merged = s["kicks_coalesced"]
    line += f" (+{own} its own at start, -{merged} merged in eventfd"
    rest = kicks + own - merged - handled
    return line + (f", {rest} unread at the end)" if rest else ")")


def timing_part(s: dict[str, Any]) -> str:
    """How long the program's traffic took, and its rate where a rate means something."""
    if s["mode"] == "sink":
        got = s.get("arrived") or 0
        if got < 2:
            return f"{got} datagram(s) received: no rate"
        return (f"{s['receive_s'] * 1e3:.2f} ms from the first datagram received to the last, "
                f"{s['host_rate_pps']:,.0f} packets/s")
    if s["mode"] == "ping":
        return f"{s['send_s'] * 1e3:.2f} ms pinging, one echo request at a time"
    if not s["packets_per_second"]:
        return "nothing sent"
    return f"{s['send_s'] * 1e3:.2f} ms sending, {s['packets_per_second']:,.0f} packets/s"


def transport_part(s: dict[str, Any]) -> str:
    """", transport modern" (and which the driver took of a transitional device); nothing
    for the default legacy device."""
    t, drv = s.get("transport", "legacy"), s.get("driver_transport")
    if t == "legacy":
        return ""
    ring = ", ring packed" if s.get("ring") == "packed" else ""
    return f", transport {t}" + (f" (driver: {drv})" if t == "transitional" and drv else "") + ring


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"run {s['run']}: mode {s['mode']}, {s['packets']} x {s['size']} B, "
        f"ioeventfd {'on' if s['ioeventfd'] else 'off'}, "
        f"event_idx {'on' if s['event_idx'] else 'off'}, interrupts {s['interrupt_mode']}"
        + transport_part(s),
        sent_line(s),
        f"  delivered              {s['delivered']}  (counted by the {s['delivered_counted_by']})",
        kicks_line(s)
        + (f", by the vhost worker: {vhost_kicks(s)}" if "vhost" in s else ""),
        f"  TX interrupts          {s['tx_interrupts']}   RX interrupts: {s['rx_interrupts']}"
        f"   injected by KVM: {s['interrupts_injected']}",
        "  interrupts taken       " + ", ".join(
            f"{k} {n}" for k, n in s["interrupts_taken"].items() if n or k != "shared")
        + " (guest's handlers)",
    ]
    e = s["exits"]
    lines.append("  VM exits               " + ", ".join(
        f"{name} {e.get(name, 0)}" for name in ("exits", "io_exits", "mmio_exits", "halt_exits",
                                                "irq_exits", "msr_exits")))
    lines.append("  exits to QEMU          " + (", ".join(
        f"{r} {n}" for r, n in s["userspace_exits"].items()) or "none"))
    lines.append(f"  elapsed                {s['elapsed_s']:.3f} s (run), {timing_part(s)}")
    if s.get("rtt_us_p50") is not None:
        lines.append(f"  round trip (guest)     p50 {s['rtt_us_p50']:.0f} us, "
                     f"p99 {s['rtt_us_p99']:.0f} us")
    if s["mode"] in ("echo", "sink", "ping") or s.get("rx_dropped"):
        lines.append(f"  received by the guest  {s['received_by_guest']} frames; waited for RX "
                     f"buffers {s['rx_no_buffer']}, queued {s['rx_queued']}, "
                     f"dropped {s['rx_dropped']}")
    vu = s.get("vhost_user")
    if vu:
        lines.append(f"  vhost-user             frames guest->back end {vu['guest_tx_frames']}, "
                     f"back end->guest {vu['guest_rx_frames']} per queue pair (the guest's "
                     f"count); link downs {vu['qemu']['link_downs']}, "
                     f"{vu['qemu']['messages']} messages")
        b = vu.get("backend")
        if b:
            lines.append("  vhost-user back end    moved guest->host "
                         f"{[q['tx_frames'] for q in b['queues']]}, host->guest "
                         f"{[q['rx_frames'] for q in b['queues']]} frames per queue pair; "
                         f"{b['cpu_s']} s CPU")
    if s.get("device_errors"):
        lines.append(f"  device errors          {'; '.join(s['device_errors'])}")
    if s.get("device_restarts") is not None:
        dups = s.get("host", {}).get("duplicates")
        lines.append(f"  QEMU restarts          {s['device_restarts']}: "
                     f"{s.get('resubmitted', 0)} TX chain(s) resubmitted"
                     + (f", {dups} duplicate(s) at the host" if dups is not None else ""))
    f = s.get("guest_fault")
    if f:
        lines.append(f"  guest fault            {f['kind']} "
                     + (f"at frame {f['at_frame']}" if f["committed"] else "never committed")
                     + f"; the guest reset the device {s['guest_resets']} time(s)")
    elif s.get("guest_resets"):
        lines.append(f"  guest resets           {s['guest_resets']}")
    return "\n".join(lines)
