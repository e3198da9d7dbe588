"""``vreplica stress``: sustained load in both directions over several queue pairs, with
chaos, a progress bar, and a verdict that says exactly what was lost, duplicated, reordered
and leaked. Exit status 0 only if nothing was lost unexpectedly and nothing leaked."""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common import netns
from common.inet import UDP_MAX_PAYLOAD
from common.ipc import object_entries
from common.seqwindow import RecentTimes, SeqWindow
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
from vreplica.run.supervisor import RunFailed, RunOptions, Supervisor
from vreplica.stress.attribution import (
    attribute,
    begin_at_entry,
    explain_seqs,
    outages,
    run_total,
    summary_of,
)
from vreplica.stress.chaos import BACKEND_KINDS, CHAOS_KINDS, Chaos, ChaosLog


def stress_size(seq: int, lo: int, hi: int, seed: int) -> int:
    """The same size function the guest's stress program uses (guestproc.programs)."""
    x = (seq * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return lo + x % (hi - lo + 1)


class FlowSink(UdpService):
    """The host end of tx stress: counts per flow (host-side source port) every datagram's
    sequence number, so loss, duplicates and reordering are exact."""

    thread_name = "stress-sink"

    def __init__(self, lo: int, hi: int, seed: int, ns: str | None = None,
                 flows: int = 1) -> None:
        super().__init__(0, ns)
        self.lo, self.hi, self.seed = lo, hi, seed
        self.seen = SeqWindow(flows)
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
        if self.seen.arrive(seq, time.monotonic_ns(), grow=True) != "new":
            self.duplicates += 1
            return
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
        self.sent_ns = RecentTimes()  # per sequence number: when it left the host
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


def sink_loss_runs(sink: FlowSink, sent: int, skip: set[int]) -> list[list[int]]:
    """The sequence numbers the sink never saw, per flow (a flow's datagrams take one queue
    pair, in order; flow f carries f, f + flows, ...), as runs [first, last, after_ns,
    before_ns] between the arrivals of their neighbours in the flow (0: none after); the
    numbers in ``skip`` (frames a ring fault took) split a run and belong to none."""
    seen = sink.seen
    if sent > seen.top:
        seen.enter(sent - 1, 0)  # the last numbers never came: lost after the last arrival
    return explain_seqs(skip, seen.runs(), seen.paths)


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> Parser:
    p = Parser(prog="vreplica stress", description=__doc__, label="vreplica stress")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--duration", type=finite_float,
                   help="seconds of load (default: 10, unless --packets)")
    g.add_argument("--packets", type=int, help="datagrams to send instead of a duration")
    p.add_argument("--queues", type=int, default=2, help="queue pairs")
    p.add_argument("--sizes", default="8-1472",
                   help="UDP payload sizes MIN-MAX (at least 8: the sequence number)")
    p.add_argument("--mode", choices=("tx", "echo", "both"), default="tx",
                   help="tx: to a host sink; echo: through a host echo service, each reply "
                        "checked; both: echo, and a host -> guest stream")
    p.add_argument("--chaos", default="", help="comma list of: " + ", ".join(CHAOS_KINDS)
                   + " (or 'all', or 'list' to describe them)")
    p.add_argument("--chaos-period", type=finite_float, default=2.0,
                   help="mean seconds between events")
    p.add_argument("--flows", type=int, default=0, help="guest sockets (0: 2 per queue pair)")
    p.add_argument("--seed", type=int, default=1,
                   help="the datagrams' sizes and the chaos's moments follow from it")
    p.add_argument("--transport", choices=TRANSPORTS, default="legacy",
                   help="virtio-pci interface (as vreplica run's --transport)")
    p.add_argument("--ring", choices=RINGS, default="split",
                   help="virtqueue layout (as vreplica run's --ring; packed needs a modern "
                        "--transport)")
    p.add_argument("--json", metavar="FILE",
                   help="write the verdict here (a run that fails: what it had so far)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="show QEMU's device error lines (a ring fault's virtio_error) as they "
                        "come; without it the verdict counts them per kind")
    add_tap_options(p)
    return p


RSS_WARM_UP_S = 10.0
"""The RSS figures' start: this long into the load (at most half of it), once each process
has imported, allocated its rings and pools and taken its first chaos."""
STALL_TIMEOUT_S = 30.0
"""The run fails if the guest reports no progress for this long (and the supervisor's grace)."""
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
    own_backend = a.netdev == "vhost-user" and not a.chardev
    if a.chaos == "all" and not own_backend:
        kinds = [k for k in kinds if k not in BACKEND_KINDS]
    for k in kinds:
        if k not in CHAOS_KINDS:
            raise UsageError(f"--chaos: unknown kind {k!r} (kinds: {', '.join(CHAOS_KINDS)})")
        if k in BACKEND_KINDS and not own_backend:
            raise UsageError(f"--chaos {k} needs --netdev vhost-user (the replica's own back "
                             "end)")
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


class SmoothedRate:
    """A count's rate per second, taken each time the count is reported and smoothed over
    about TAU_S (an exponential moving average): the bar does not flip with each report."""

    TAU_S = 2.0

    def __init__(self) -> None:
        self.t = 0.0
        self.count = 0
        self.rate = 0.0

    def update(self, count: int, now: float) -> None:
        if count == self.count and now - self.t < 1.0:  # no new report yet
            return
        if self.t:
            dt = max(1e-3, now - self.t)
            alpha = 1.0 - math.exp(-dt / self.TAU_S)
            self.rate += alpha * ((count - self.count) / dt - self.rate)
        self.t, self.count = now, count


def progress_line(mode: str, p: dict[str, int], send_rate: float, exit_rate: float,
                  at_sink: int, inbound_sent: int) -> str:
    """The bar's figures, named as the verdict names them: the guest's sends, what came back
    (echo replies, or what reached the host's sink), the host's inbound stream."""
    parts = [f"sent {p['sent']:,} ({send_rate:,.0f}/s)"]
    if mode == "tx":
        parts.append(f"at the host's sink {at_sink:,}")
    else:
        parts.append(f"replies {p['replies']:,}, awaiting {p['awaiting']:,}")
    if mode == "both":
        parts.append(f"inbound {p['inbound']:,} of {inbound_sent:,}")
    parts.append(f"VM exits {exit_rate:,.0f}/s")
    return ", ".join(parts)


class StressProgress:
    """The progress bar, fed by the guest's console lines and the supervisor's ticks, and
    each process's RSS at the start (once the load has run a while) and the end."""

    def __init__(self, a: argparse.Namespace, sup: Supervisor, chaos: Chaos, host: HostSide,
                 duration: float) -> None:
        self.a, self.sup, self.chaos, self.host, self.duration = a, sup, chaos, host, duration
        self.rss_start: dict[str, int] = {}
        self.rss_end: dict[str, int] = {}
        self.progress = {"sent": 0, "replies": 0, "inbound": 0, "awaiting": 0}
        total = a.packets or duration
        self.bar = tqdm(total=total, unit="pkt" if a.packets else "s", disable=a.no_progress,
                        file=sys.stderr, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}]"
                                   "{postfix}")
        self.t_start = self.last_tick = time.monotonic()
        self.started_at = 0.0
        self.warm_up_s = min(RSS_WARM_UP_S, (duration or 10.0) / 2)
        self.send_rate, self.exit_rate = SmoothedRate(), SmoothedRate()

    def on_console(self, role: str, line: str) -> None:
        inbound = self.host.inbound
        if line == "stress started":
            self.started_at = time.monotonic()
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
            self.send_rate.update(self.progress["sent"], time.monotonic())

    def on_tick(self) -> None:
        now = time.monotonic()
        if now - self.last_tick < 0.25:
            return
        self.last_tick = now
        rss = {role: v for role, v in self.sup.rss().items() if v > 0}  # exiting: 0
        if self.started_at and now - self.started_at >= self.warm_up_s:
            for role, v in rss.items():  # a QEMU being restarted then: its successor's first
                self.rss_start.setdefault(role, v)
        self.rss_end.update(rss)
        self.exit_rate.update(self.sup.live.get("kvm", {}).get("vcpu", {}).get("exits", 0), now)
        sink, inbound = self.host.sink, self.host.inbound
        self.bar.set_postfix_str(progress_line(
            self.a.mode, self.progress, self.send_rate.rate, self.exit_rate.rate,
            sink.seen.came if sink is not None else 0, inbound.sent if inbound is not None else 0))
        self.bar.n = self.progress["sent"] if self.a.packets else min(self.duration,
                                                                      now - self.t_start)
        self.bar.refresh()

    def so_far(self, failure: RunFailed, log: ChaosLog, flows: int) -> dict[str, Any]:
        """What a run that could not finish had measured, and why it ended."""
        a, sink, inbound = self.a, self.host.sink, self.host.inbound
        return {
            "mode": a.mode, "queues": a.queues, "flows": flows,
            "duration_s": round(time.monotonic() - self.t_start, 2),
            "sent": self.progress["sent"],
            "delivered": sink.seen.came if sink is not None else self.progress["replies"],
            "inbound_sent": inbound.sent if inbound else 0,
            "inbound_received": self.progress["inbound"],
            "device_restarts": self.sup.restarts,
            "chaos": [{k: v for k, v in e.items() if not k.endswith("_ns")} for e in log.events],
            "rss_start_mb": {r: round(v / 2**20, 1) for r, v in self.rss_start.items()},
            "rss_end_mb": {r: round(v / 2**20, 1) for r, v in self.rss_end.items()},
            "device_error_lines": dict(self.sup.error_lines),
            "leftovers": leftovers_of(self.sup), "reasons": [str(failure)], "verdict": "FAIL"}


class StressFailed(RunFailed):
    """The run could not finish; ``verdict`` is what it had measured so far, and why."""

    def __init__(self, message: str, code: int, verdict: dict[str, Any]) -> None:
        super().__init__(message, code)
        self.verdict = verdict


def leftovers_of(sup: Supervisor) -> list[str]:
    """What the run left behind: IPC objects, its network namespace, its run directory."""
    cfg = sup.cfg
    if cfg is None:
        return []
    return [str(p) for p in object_entries(cfg.rid)] + (
        [cfg.rundir] if Path(cfg.rundir).exists() else [])


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
            host.sink = FlowSink(lo, hi, a.seed, ns, flows)
        else:
            host.echo = UdpEcho(0, ns=ns)
        if a.mode == "both":
            host.inbound = InboundStream(GUEST_PORT if ns else hostfwd[0][0], 2000.0, ns)
        return host.sink.port if host.sink else host.echo.port  # type: ignore[union-attr]

    if a.mode == "both" and tap.get("netdev") != "tap":  # slirp's, in QEMU or the back end
        hostfwd = [(free_udp_port(), GUEST_PORT)]
    opts = RunOptions(mode="stress", packets=a.packets or 0, size=hi, dest_port=0,
                      queues=a.queues, hostfwd=hostfwd, guest_port=GUEST_PORT, window=32,
                      timeout=STALL_TIMEOUT_S, reconnect="kill-device" in kinds,
                      extra={"stress_mode": a.mode, "duration_s": duration, "sizes": [lo, hi],
                             "seed": a.seed, "flows": flows, "live_stats": True,
                             "transport": a.transport, "ring": a.ring,
                             "restart_backend": "kill-backend" in kinds, **tap})
    sup = Supervisor(opts)
    sup.show_error_lines = a.verbose
    if tap.get("netdev") == "tap":
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

    failure: RunFailed | None = None
    try:
        try:
            cfg = sup.run(before_stop=quiet_host_side)
        except RunFailed as e:
            failure = e
        finally:
            watch.bar.close()
        if failure is None:
            time.sleep(0.3)
            reports = sup.reports()
            summary = build_summary(cfg.rid, opts, reports, None, sup.t_end - sup.t_start)
    finally:
        for h in (host.sink, host.echo):
            if h is not None:
                h.close()
        sup.cleanup()
    if failure is not None:
        raise StressFailed(str(failure), failure.code, watch.so_far(failure, log, flows))
    verdict = judge(a, StressRun(cfg, sup, reports, summary, host, log, watch, tap, flows,
                                 (lo, hi), kinds))
    return verdict, 1 if verdict["reasons"] else 0


def judge(a: argparse.Namespace, run: StressRun) -> dict[str, Any]:
    """The verdict: every loss attributed to the chaos that caused it, or named."""
    sup, reports, summary = run.sup, run.reports, run.summary
    sink, inbound = run.host.sink, run.host.inbound
    flows, tap, kinds = run.flows, run.tap, run.kinds
    lo, hi = run.sizes
    rss_start, rss_end = run.watch.rss_start, run.watch.rss_end
    leftovers = leftovers_of(sup)
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
        delivered, duplicated, reordered = sink.seen.came, sink.duplicates, sink.reordered
        lost = max(0, sent - delivered)
        lost_expected = sum(1 for seq in faulted if not sink.seen.has(seq))
        unexplained_runs: list[list[int]] = []
        backend_kills = [e for e in events if e.kind == "kill-backend"]
        if backend_kills:  # the link was down meanwhile: QEMU dropped what the guest sent
            runs = sink_loss_runs(sink, sent, faulted)
            _, explained_k, unexplained_runs = attribute(runs, flows, backend_kills, now_ns)
            lost_expected += explained_k
    else:
        delivered = prog.get("replies", 0)
        duplicated = prog.get("duplicate_replies", 0)
        reordered = 0
        gaps = prog.get("reply_gaps", [])
        runs = explain_seqs(faulted, gaps, flows)
        lost_w, explained_w, unexplained_runs = attribute(runs, flows, events, now_ns)
        lost = max(0, sent - delivered)
        lost_expected = run_total(gaps, flows) - run_total(runs, flows) + explained_w
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
        "netdev": ("tap+vhost" if tap.get("vhost") else tap.get("netdev", "tap")) if tap
        else "user",
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
        "device_error_lines": dict(sup.error_lines),
        "vhost_packets": [[vq["packets"] for vq in dev["vqs"]]  # per queue pair: RX, TX
                          for dev in summary.get("vhost", {}).get("kernel", [])],
        "packets_per_second": round(sent / max(1e-9, prog.get("send_ns", 0) / 1e9), 1),
        "vhost_user": summary.get("vhost_user"),
        "backend_restarts": len(sup.backend_restarts),
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


CHAOS_LISTED = 12
"""Up to this many chaos events the verdict lists each; beyond, a count per kind (--json
keeps every one)."""


def chaos_row(events: list[dict[str, Any]]) -> str:
    """The chaos events, each with its time and loss, or, for a long run, per kind: how many,
    the frames they lost and the most one lost."""
    if len(events) <= CHAOS_LISTED:
        return ", ".join(f"{e['t_s']}s {e['kind']}" + (f" (lost {e['lost']})" if e["lost"]
                                                       else "") for e in events) or "none"
    kinds: dict[str, list[int]] = {}
    for e in events:
        kinds.setdefault(e["kind"], []).append(e["lost"])
    return f"{len(events)}: " + ", ".join(
        f"{kind} {len(lost)} (lost {sum(lost):,}" + (f", at most {max(lost):,} by one)"
                                                     if sum(lost) else ")")
        for kind, lost in kinds.items())


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
        ("chaos events", chaos_row(v["chaos"])),
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
        ("device error lines", ", ".join(f"{n:,} x '{kind}'" for kind, n in
                                         v["device_error_lines"].items())
         + " (--verbose shows each)" if v["device_error_lines"] else "none"),
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
    """Run, print the verdict (and write it with --json); 0 if it passed. A run that could
    not finish still writes what it had so far, with the reason."""
    try:
        verdict, code = run_stress(a)
    except StressFailed as e:
        if a.json:
            Path(a.json).write_text(json.dumps(e.verdict, indent=1))
        raise
    print(format_verdict(verdict))
    if a.json:
        Path(a.json).write_text(json.dumps(verdict, indent=1))
    return code
