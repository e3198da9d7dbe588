"""``vreplica stress``: sustained load in both directions over several queue pairs, with
chaos, a progress bar, and a verdict that says exactly what was lost, duplicated, reordered
and leaked. Exit status 0 only if nothing was lost unexpectedly and nothing leaked."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from array import array
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common import netns
from common.inet import UDP_MAX_PAYLOAD
from common.ipc import object_entries
from vreplica.run.hostside import SEQ_BYTES, UdpEcho, UdpService, expected_payload
from vreplica.run.launch import free_udp_port, reported
from vreplica.run.options import (
    RINGS,
    TRANSPORTS,
    Parser,
    add_tap_options,
    check_ring,
    tap_options,
)
from vreplica.run.preflight import UsageError, finite_float, writable_file
from vreplica.run.summary import build_summary
from vreplica.run.supervisor import RunOptions, Supervisor
from vreplica.stress.attribution import attribute, begin_at_entry, explain_seqs, outages, summary_of
from vreplica.stress.chaos import CHAOS_KINDS, Chaos, ChaosLog


def stress_size(seq: int, lo: int, hi: int, seed: int) -> int:
    """The same size function the guest's stress program uses (guestproc.programs)."""
    x = (seq * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return lo + x % (hi - lo + 1)


class FlowSink(UdpService):
    """The host end of tx stress: counts per flow (host-side source port) every datagram's
    sequence number, so loss, duplicates and reordering are exact."""

    thread_name = "stress-sink"

    def __init__(self, lo: int, hi: int, seed: int, ns: str | None = None) -> None:
        super().__init__(0, ns)
        self.lo, self.hi, self.seed = lo, hi, seed
        self.seen: set[int] = set()
        self.received = self.duplicates = self.reordered = self.bad = 0
        self.last_by_flow: dict[int, int] = {}
        self.serve()

    def handle(self, data: bytes, peer: tuple[str, int]) -> None:
        sport = peer[1]
        self.received += 1
        seq = int.from_bytes(data[:SEQ_BYTES], "big")
        if data != expected_payload(seq, stress_size(seq, self.lo, self.hi, self.seed)):
            self.bad += 1
            return
        if seq in self.seen:
            self.duplicates += 1
            return
        self.seen.add(seq)
        if seq < self.last_by_flow.get(sport, -1):
            self.reordered += 1
        self.last_by_flow[sport] = max(seq, self.last_by_flow.get(sport, -1))


class InboundStream:
    """Host -> guest traffic through the hostfwd port (over a tap: to the guest's address,
    from inside the run's namespace), at a steady rate, until stopped; datagram N carries
    sequence number N, as the guest's do."""

    def __init__(self, port: int, rate_pps: float, ns: str | None = None) -> None:
        self.port = port
        self.ns = ns
        self.dest = netns.GUEST_ADDR if ns else "127.0.0.1"
        self.interval = 1.0 / rate_pps
        self.sent = 0
        self.sent_ns = array("q")  # per sequence number: when it left the host (monotonic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stress-inbound", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with netns.entered(self.ns) if self.ns else nullcontext():
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock as s:
            while not self._stop.wait(self.interval):
                self.sent_ns.append(time.monotonic_ns())
                s.sendto(expected_payload(self.sent, 64), (self.dest, self.port))
                self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="vreplica stress", description=__doc__, label="vreplica stress")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--duration", type=finite_float, help="seconds of load (default 10)")
    g.add_argument("--packets", type=int, help="datagrams to send instead of a duration")
    p.add_argument("--queues", type=int, default=2, help="queue pairs (default 2)")
    p.add_argument("--sizes", default="8-1472",
                   help="UDP payload sizes MIN-MAX (at least 8: the sequence number)")
    p.add_argument("--mode", choices=("tx", "echo", "both"), default="tx")
    p.add_argument("--chaos", default="", help="comma list of: " + ", ".join(CHAOS_KINDS)
                   + " (or 'all', or 'list' to describe them)")
    p.add_argument("--chaos-period", type=finite_float, default=2.0,
                   help="mean seconds between events")
    p.add_argument("--flows", type=int, default=0, help="guest sockets (default 2 per pair)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--transport", choices=TRANSPORTS, default="legacy",
                   help="virtio-pci interface (as vreplica run's --transport)")
    p.add_argument("--ring", choices=RINGS, default="split",
                   help="virtqueue layout (as vreplica run's --ring; packed needs a modern "
                        "--transport)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--no-progress", action="store_true")
    add_tap_options(p)
    return p.parse_args(argv)


GUEST_PORT = 7000
"""Where the guest listens for the host's inbound stream (mode both)."""


def stress_tap_options(a: argparse.Namespace) -> dict[str, Any]:
    """--netdev tap [--vhost on]: what RunOptions.extra takes (the run's own options that
    stress does not have count as off)."""
    for name, default in (("ioeventfd", True), ("vectors", None), ("reconnect", False),
                          ("hostfwd", None), ("guest_fault", None)):
        setattr(a, name, getattr(a, name, default))
    return tap_options(a)


def check(a: argparse.Namespace) -> tuple[int, int, list[str]]:
    try:
        lo, hi = (int(x) for x in a.sizes.split("-", 1))
    except ValueError:
        raise UsageError(f"--sizes {a.sizes!r}: expected MIN-MAX, e.g. 8-1472") from None
    if lo > hi or lo < 0 or hi > UDP_MAX_PAYLOAD:
        raise UsageError(f"--sizes must lie within 0-{UDP_MAX_PAYLOAD} with MIN <= MAX")
    lo = max(lo, SEQ_BYTES)
    hi = max(hi, lo)
    if not 1 <= a.queues <= 8:
        raise UsageError("--queues must be between 1 and 8")
    if a.duration is not None and not 0 < a.duration <= 3600:
        raise UsageError("--duration must be between 0 and 3600 seconds")
    if a.packets is not None and not 1 <= a.packets <= 100_000_000:
        raise UsageError("--packets must be between 1 and 100000000")
    kinds = [k for k in a.chaos.split(",") if k] if a.chaos != "all" else list(CHAOS_KINDS)
    for k in kinds:
        if k not in CHAOS_KINDS:
            raise UsageError(f"--chaos: unknown kind {k!r} (kinds: {', '.join(CHAOS_KINDS)})")
    if a.chaos_period <= 0 or a.flows < 0:
        raise UsageError("--chaos-period must be positive and --flows >= 0 (0: two per pair)")
    check_ring(a)
    if a.json:
        writable_file("--json", a.json)
    return lo, hi, kinds


@dataclass
class HostSide:
    """The host's end of a stress run: a sink (tx) or an echo service, and the inbound
    stream (both)."""

    sink: FlowSink | None = None
    echo: UdpEcho | None = None
    inbound: InboundStream | None = None


class StressProgress:
    """The progress bar, fed by the guest's console lines and the supervisor's ticks, and
    each process's RSS at the start and the end."""

    def __init__(self, a: argparse.Namespace, sup: Supervisor, chaos: Chaos, host: HostSide,
                 duration: float) -> None:
        self.a, self.sup, self.chaos, self.host, self.duration = a, sup, chaos, host, duration
        self.rss_start: dict[str, int] = {}
        self.rss_end: dict[str, int] = {}
        self.progress = {"sent": 0, "replies": 0, "inbound": 0}
        total = a.packets or duration
        self.bar = tqdm(total=total, unit="pkt" if a.packets else "s", disable=a.no_progress,
                        file=sys.stderr, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}] "
                                   "{postfix}")
        self.t_start = time.monotonic()
        self.last = {"t": self.t_start, "delivered": 0}
        self.exit_rate = {"t": self.t_start, "exits": 0, "rate": 0.0}

    def delivered_now(self) -> int:
        if self.host.sink is not None:
            return len(self.host.sink.seen)
        return self.progress["replies"] + self.progress["inbound"]

    def on_console(self, role: str, line: str) -> None:
        inbound = self.host.inbound
        if line == "stress started":
            self.chaos.start()
            if inbound is not None:
                inbound.start()
        elif line == "stress finishing":
            self.chaos.stop()
            if inbound is not None:
                inbound.stop()
        elif line.startswith("progress"):
            for part in line.split()[1:]:
                k, v = part.split("=")
                self.progress[k] = int(v)

    def on_tick(self) -> None:
        now = time.monotonic()
        last, exit_rate, progress = self.last, self.exit_rate, self.progress
        if now - last["t"] < 0.25:
            return
        rss = {role: v for role, v in self.sup.rss().items() if v > 0}  # exiting: 0
        if not self.rss_start and now - self.t_start > 1.0:
            self.rss_start.update(rss)
        self.rss_end.update(rss)
        d = self.delivered_now()
        exits = self.sup.live.get("kvm", {}).get("vcpu", {}).get("exits", 0)
        if exits != exit_rate["exits"]:
            exit_rate.update(rate=(exits - exit_rate["exits"]) / (now - exit_rate["t"]), t=now,
                             exits=exits)
        dt = now - last["t"]
        in_flight = max(0, progress["sent"] - d)
        self.bar.set_postfix_str(f"{(d - last['delivered']) / dt:,.0f} pkt/s, delivered {d:,}, "
                                 f"in flight {in_flight:,}, exits {exit_rate['rate']:,.0f}/s")
        self.bar.n = progress["sent"] if self.a.packets else min(self.duration,
                                                                 now - self.t_start)
        self.bar.refresh()
        last.update(t=now, delivered=d)


@dataclass
class StressRun:
    """What a finished stress run left to judge."""

    cfg: Any
    sup: Supervisor
    reports: dict[str, Any]
    summary: dict[str, Any]
    host: HostSide
    log: ChaosLog
    watch: StressProgress
    tap: dict[str, Any]
    flows: int
    sizes: tuple[int, int]
    kinds: list[str]


def run_stress(a: argparse.Namespace) -> tuple[dict[str, Any], int]:
    lo, hi, kinds = check(a)
    tap = stress_tap_options(a)
    duration = a.duration if a.duration is not None else (0 if a.packets else 10.0)
    flows = a.flows or 2 * a.queues
    host = HostSide()
    hostfwd: list[tuple[int, int]] = []

    def start_services(ns: str | None) -> int:
        """The host's end: on loopback for slirp, on 10.0.2.2 in the run's namespace behind a
        tap; the port the guest sends to."""
        if a.mode == "tx":
            host.sink = FlowSink(lo, hi, a.seed, ns)
        else:
            host.echo = UdpEcho(0, ns=ns)
        if a.mode == "both":
            host.inbound = InboundStream(GUEST_PORT if ns else hostfwd[0][0], 2000.0, ns)
        return host.sink.port if host.sink else host.echo.port  # type: ignore[union-attr]

    if a.mode == "both" and not tap:
        hostfwd = [(free_udp_port(), GUEST_PORT)]
    opts = RunOptions(mode="stress", packets=a.packets or 0, size=hi, dest_port=0,
                      queues=a.queues, hostfwd=hostfwd, guest_port=GUEST_PORT, window=32,
                      timeout=(duration or 60) + 60, reconnect="kill-device" in kinds,
                      extra={"stress_mode": a.mode, "duration_s": duration, "sizes": [lo, hi],
                             "seed": a.seed, "flows": flows, "live_stats": True,
                             "transport": a.transport, "ring": a.ring, **tap})
    sup = Supervisor(opts)
    if tap:
        def before_spawn(cfg: Any) -> None:
            opts.dest_port = cfg.options["dest_port"] = start_services(cfg.options["netns"])
            chaos.echo = host.echo

        sup.before_spawn = before_spawn
    else:
        opts.dest_port = start_services(None)
    log = ChaosLog(time.monotonic())
    chaos = Chaos(kinds, sup, host.echo, log, a.seed, a.chaos_period)
    watch = StressProgress(a, sup, chaos, host, duration)
    sup.on_console = watch.on_console
    sup.on_tick = watch.on_tick

    def quiet_host_side() -> None:
        chaos.stop()
        if host.inbound is not None:
            host.inbound.stop()

    try:
        try:
            cfg = sup.run(before_stop=quiet_host_side)
        finally:
            watch.bar.close()
        time.sleep(0.3)
        reports = sup.reports()
        summary = build_summary(cfg.rid, opts, reports, None, sup.t_end - sup.t_start)
    finally:
        for h in (host.sink, host.echo):
            if h is not None:
                h.close()
        sup.cleanup()
    verdict = judge(a, StressRun(cfg, sup, reports, summary, host, log, watch, tap, flows,
                                 (lo, hi), kinds))
    return verdict, 1 if verdict["reasons"] else 0


def judge(a: argparse.Namespace, run: StressRun) -> dict[str, Any]:
    """The verdict: every loss attributed to the chaos that caused it, or named."""
    cfg, sup, reports, summary = run.cfg, run.sup, run.reports, run.summary
    sink, echo, inbound = run.host.sink, run.host.echo, run.host.inbound
    flows, tap, kinds = run.flows, run.tap, run.kinds
    lo, hi = run.sizes
    rss_start, rss_end = run.watch.rss_start, run.watch.rss_end
    leftovers = [str(p) for p in object_entries(cfg.rid)] + (
        [cfg.rundir] if Path(cfg.rundir).exists() else [])
    guest = reports.get("guest", {})
    prog = guest.get("program", {})
    qemu = reports.get("qemu", {})
    sent = prog.get("sent", 0)
    events = outages(run.log.events, guest.get("reset_log", []),
                     qemu.get("cpr", {}).get("incomings", []))
    now_ns = time.monotonic_ns()
    faulted = set(prog.get("faulted_seqs", []))  # frames that carried a ring fault
    faults = [e for e in events if e.kind == "ring-fault"]
    for e, seq in zip(faults, prog.get("faulted_seqs", []), strict=False):
        e.lost += 1
        e.detail["faulted_seq"] = seq
    if sink is not None:
        delivered, duplicated, reordered = len(sink.seen), sink.duplicates, sink.reordered
        lost = max(0, sent - delivered)
        lost_expected = len(faulted - sink.seen)
        unexplained_runs: list[list[int]] = []
    else:
        delivered = prog.get("replies", 0)
        duplicated = prog.get("duplicate_replies", 0)
        reordered = 0
        ignored = echo.ignored_seqs if echo is not None else set()
        runs = explain_seqs(faulted | ignored, prog.get("reply_gaps", []), flows)
        lost_w, explained_w, unexplained_runs = attribute(runs, flows, events, now_ns)
        unanswered = set(prog.get("unanswered_seqs", []))
        lost = max(0, sent - delivered)
        lost_expected = len(unanswered & (ignored | faulted)) + explained_w
    inbound_runs = list(prog.get("inbound_gaps", []))
    if inbound is not None and inbound.sent > prog.get("inbound_seen", 0):
        inbound_runs.append([prog.get("inbound_seen", 0), inbound.sent - 1,
                             prog.get("inbound_last_ns", 0), 0])
    if inbound is not None:
        begin_at_entry(inbound_runs, inbound.sent_ns)
    in_lost, in_explained, in_unexplained = attribute(inbound_runs, 1, events, now_ns)
    restarts = sup.restarts
    sqs = guest.get("sq", [])
    outage_figures = summary_of(events)
    verdict = {
        "mode": a.mode, "queues": a.queues, "flows": flows, "sizes": [lo, hi],
        "netdev": ("tap+vhost" if tap.get("vhost") else "tap") if tap else "user",
        "duration_s": round(sup.t_end - sup.t_start, 2), "sent": sent, "delivered": delivered,
        "lost": lost, "lost_expected": lost_expected, "lost_unexpected": lost - lost_expected,
        "unexplained_runs": unexplained_runs[:20],
        "duplicated": duplicated, "reordered": reordered,
        "bad_payloads": (sink.bad if sink else prog.get("bad_replies", 0)),
        "inbound_sent": inbound.sent if inbound else 0, "inbound_received": prog.get("inbound", 0),
        "inbound_lost": in_lost, "inbound_lost_expected": in_explained,
        "inbound_lost_unexpected": in_lost - in_explained,
        "inbound_unexplained_runs": in_unexplained[:20],
        "inbound_rate_pps": round(inbound.sent / max(1e-9, sup.t_end - sup.t_start), 1)
        if inbound else 0,
        "kicks_per_packet": round(summary["kicks"] / sent, 4) if sent else None,
        "interrupts_per_packet": round((summary["tx_interrupts"] + summary["rx_interrupts"])
                                       / sent, 4) if sent else None,
        "exits": summary["exits"], "userspace_exits": summary["userspace_exits"],
        "rss_start_mb": {r: round(v / 2**20, 1) for r, v in rss_start.items()},
        "rss_end_mb": {r: round(v / 2**20, 1) for r, v in rss_end.items()},
        "chaos": [{"t_s": e.t_s, "kind": e.kind, "down_ms": e.down_ms, "lost": e.lost,
                   **e.detail} for e in events],
        **outage_figures,
        "netqueue_dropped_at_driver_ok": qemu.get("netqueue", {}).get("nic_flush_dropped", 0),
        "device_restarts": restarts,
        "tx_ring_full_stops": sum(q.get("stops", 0) for q in sqs),
        "tx_ring_wakes": sum(q.get("wakes", 0) for q in sqs),
        "slirp_send_errors": qemu.get("slirp", {}).get("stats", {}).get("udp_send_errors", 0),
        "device_errors": summary["device_errors"], "leftovers": leftovers,
        "vhost_packets": [[vq["packets"] for vq in dev["vqs"]]  # per queue pair: RX, TX
                          for dev in summary.get("vhost", {}).get("kernel", [])],
        "packets_per_second": round(sent / max(1e-9, prog.get("send_ns", 0) / 1e9), 1),
    }
    verdict["reasons"] = reasons = fail_reasons(verdict, kinds)
    verdict["verdict"] = "FAIL" if reasons else "PASS"
    return verdict


def fail_reasons(v: dict[str, Any], kinds: list[str]) -> list[str]:
    """Why the run failed, one line each; none if it passed."""
    out = []
    direction = "guest->host" if v["mode"] == "tx" else "echo"
    if v["lost_unexpected"]:
        out.append(f"{v['lost']:,} {direction} datagrams lost, {v['lost_expected']:,} explained "
                   f"by chaos ({v['lost_unexpected']:,} not)")
    if v["inbound_lost_unexpected"]:
        out.append(f"{v['inbound_lost']:,} host->guest datagrams lost, "
                   f"{v['inbound_lost_expected']:,} explained by chaos")
    if v["duplicated"] and "kill-device" not in kinds:
        out.append(f"{v['duplicated']:,} duplicates without a device restart to explain them")
    if v["bad_payloads"]:
        out.append(f"{v['bad_payloads']:,} datagrams arrived with a wrong payload")
    if v["leftovers"]:
        out.append(f"left behind: {', '.join(v['leftovers'])}")
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f} ms"


def format_verdict(v: dict[str, Any]) -> str:
    lost_row = (f"{v['lost']:,} (explained by chaos: {v['lost_expected']:,}, "
                f"unexplained: {v['lost_unexpected']:,})")
    rows = [
        ("mode", f"{v['mode']} over {v.get('netdev', 'user')}, {v['queues']} queue pairs, "
                 f"{v['flows']} flows, "
                 f"sizes {v['sizes'][0]}-{v['sizes'][1]} B"),
        ("sent (guest)", f"{v['sent']:,} in {v['duration_s']} s "
                         f"({v['packets_per_second']:,.0f} pkt/s)"),
        ("delivered", f"{v['delivered']:,}" + (" replies" if v["mode"] != "tx" else "")),
        ("lost", lost_row),
        ("duplicated", f"{v['duplicated']:,}"), ("reordered", f"{v['reordered']:,}"),
        ("bad payloads", f"{v['bad_payloads']:,}"),
        ("kicks / packet", f"{v['kicks_per_packet']}"),
        ("interrupts / packet", f"{v['interrupts_per_packet']}"),
        ("VM exits", ", ".join(f"{k} {n:,}" for k, n in v["exits"].items() if n)),
        ("exits to QEMU", ", ".join(f"{k} {n:,}" for k, n in v["userspace_exits"].items())),
        ("RSS MB start -> end", ", ".join(f"{r} {v['rss_start_mb'].get(r, '?')} -> "
                                          f"{v['rss_end_mb'].get(r, '?')}"
                                          for r in ("guest", "kvm", "qemu"))),
        ("chaos events", ", ".join(
            f"{e['t_s']}s {e['kind']}" + (f" (lost {e['lost']})" if e["lost"] else "")
            for e in v["chaos"]) or "none"),
        ("device resets", f"{v['resets']}: down at most {_ms(v['reset_down_ms_max'])} "
                          f"(RX back with buffers after {_ms(v['reset_rx_down_ms_max'])}), "
                          f"at most {v['reset_lost_max']:,} frames lost by one"),
        ("device restarts", f"{v['device_restarts']}: down at most "
                            f"{_ms(v['restart_down_ms_max'])}, at most "
                            f"{v['restart_lost_max']:,} frames lost by one"),
        ("TX ring full", f"queue stopped {v['tx_ring_full_stops']:,} times, woken "
                         f"{v['tx_ring_wakes']:,} (skb_xmit_done)"),
        *([("slirp sendto failed", f"{v['slirp_send_errors']:,} (dropped, as libslirp does)")]
          if v.get("netdev", "user") == "user" else []),
        ("leftovers", ", ".join(v["leftovers"]) or "none"),
        ("verdict", v["verdict"]),
    ]
    if v["mode"] == "both":
        rows.insert(3, ("inbound (host -> guest)",
                        f"{v['inbound_received']:,} of {v['inbound_sent']:,} received "
                        f"({v['inbound_rate_pps']:,.0f} pkt/s); lost {v['inbound_lost']:,} "
                        f"(explained by chaos: {v['inbound_lost_expected']:,}, unexplained: "
                        f"{v['inbound_lost_unexpected']:,})"))
    w = max(len(r[0]) for r in rows)
    text = "\n".join(f"  {k.ljust(w)}  {val}" for k, val in rows)
    return text + "".join(f"\n  FAIL: {r}" for r in v["reasons"])


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.chaos == "list":
        for kind, text in CHAOS_KINDS.items():
            print(f"{kind:12} {text}")
        return 0
    return reported("vreplica stress", lambda: stress(a))


def stress(a: argparse.Namespace) -> int:
    """Run, print the verdict (and write it with --json); 0 if it passed."""
    verdict, code = run_stress(a)
    print(format_verdict(verdict))
    if a.json:
        Path(a.json).write_text(json.dumps(verdict, indent=1))
    return code
