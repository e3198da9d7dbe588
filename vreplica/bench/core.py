"""``vreplica bench``: the replica's transmit path measured against its baselines.

Usage: vreplica bench [--quick] [--json FILE] [--out DIR]

Writes BENCHMARKS.md and bench.png at the repository root, or into DIR with --out. Every
figure is the median of several trials; every ratio compares figures from the same
invocation. "1500" in the tables is a 1472-byte UDP payload: the largest datagram the
replica carries in a 1500-byte MTU.
"""

from __future__ import annotations

import bisect
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import psutil

from common.kvm_abi import LOCAL_TIMER_VECTOR
from common.trace import vq_index
from qemuproc.virtio_net import TX_TIMER_INTERVAL_NS
from vreplica.bench import baselines as bl
from vreplica.bench import stages
from vreplica.bench.rings import render_rings, section_rings
from vreplica.bench.stages import ThreadCpuSampler
from vreplica.bench.transport import section_transport, transport_table
from vreplica.run.options import Parser
from vreplica.run.preflight import UsageError, writable_dir, writable_file
from vreplica.run.summary import build_summary
from vreplica.run.supervisor import RunFailed, RunOptions, Supervisor

ROOT = Path(__file__).resolve().parents[2]
SIZES = (64, 1472)
SIZE_LABEL = {64: "64", 1472: "1500 (1472 B payload)"}
LEGEND = {64: "64 B", 1472: "1500 (1472 B payload)"}
ROLES = ("guest", "kvm", "qemu")
MB = 1 << 20

MODES: dict[str, dict[str, Any]] = {
    "default": {},
    "tx=timer": {"tx": "timer"},
    "tx-burst=16": {"tx_burst": 16},
    "tx-burst=64": {"tx_burst": 64},
    "event-idx=off": {"event_idx": False},
    "ioeventfd=off": {"ioeventfd": False},
    "poll-us=50": {"extra": {"poll_us": 50.0}},
    "tap": {"extra": {"netdev": "tap", "csum": True}},
    "tap+vhost": {"extra": {"netdev": "tap", "csum": True, "vhost": True}},
}
"""QEMU configurations run end to end; "default" is --tx bh --tx-burst 256 --event-idx on
--ioeventfd on --poll-us 0 over slirp, and every other changes one setting ("tap": QEMU's
tap backend into the run's namespace; "tap+vhost": vhost-net serves the rings)."""

TARGETS = {
    "e2e": "end-to-end >= 1.0x the mp.Queue+sendto baseline at 64 B",
    "latency": "kick->pop p50 <= 1.5x the paced ping-pong pinned to two CPUs (ioeventfd on)",
    "trace_off": "tracing off costs <= 3%",
    "event_idx": "--event-idx off >= 0.48x the default mode at 64 B",
    "tx_burst": "--tx-burst 16 and 64 >= 0.95x the default mode at 64 B",
    "ioeventfd": "ioeventfd on at least as fast as off at 64 B",
    "tx_timer": "tx=timer kick->pop p50 <= 2x the 150 us x-txtimer",
    "vring": "vring-only / bare ring, per-side bounds, >= 0.3x at both sizes",
    "kicks": "<= 0.01 kicks/packet in a saturating burst",
    "irqs": "<= 0.01 interrupts/packet in a saturating burst",
    "rss": "each process <= 50 MB RSS",
    "vhost": "tap+vhost >= 1.0x the userspace tap path at 64 B and 1500",
    "vhost_burst": "tap+vhost kicks and interrupts per packet <= the userspace tap path's",
    "vhost_device": "tap+vhost device side CPU per packet < the userspace tap path's",
    "vhost_worker": "vhost worker CPU per packet <= 0.6x QEMU's main loop on the userspace "
                    "tap path",
    "vhost_user": "vhost-user >= 1.0x the userspace tap path at 64 B and 1500",
    "vhost_user_burst": "vhost-user kicks and interrupts per packet <= the userspace tap "
                        "path's",
}
"""The project's goals; ``targets`` measures each."""


@dataclass
class Plan:
    """How much of everything one invocation measures."""

    quick: bool
    trials: int
    micro_trials: int
    micro_packets: int
    e2e_packets: int
    latency_packets: int
    latency_trials: int
    pace_ms: float
    pingpong_rounds: int
    flush_rounds: int
    sizes: tuple[int, ...] = SIZES
    modes: tuple[str, ...] = tuple(MODES)


FULL = Plan(quick=False, trials=3, micro_trials=5, micro_packets=200_000, e2e_packets=20_000,
            latency_packets=200, latency_trials=3, pace_ms=2.0, pingpong_rounds=5000,
            flush_rounds=800)
QUICK = Plan(quick=True, trials=3, micro_trials=3, micro_packets=30_000, e2e_packets=3000,
             latency_packets=60, latency_trials=3, pace_ms=2.0, pingpong_rounds=1000,
             flush_rounds=200)


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- one run of the replica ---------------------------------------------------------------------


class RssSampler:
    """Peak RSS (and USS, sampled less often) of each process while a run goes on."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02) -> None:
        self.procs = {}
        for role, pid in pids.items():
            try:
                self.procs[role] = psutil.Process(pid)
            except psutil.Error:
                pass
        self.interval = interval
        self.rss = dict.fromkeys(self.procs, 0)
        self.uss = dict.fromkeys(self.procs, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            full = self.samples % 5 == 0
            for role, p in self.procs.items():
                try:
                    if full:
                        mi = p.memory_full_info()
                        self.uss[role] = max(self.uss[role], mi.uss)
                    else:
                        mi = p.memory_info()
                    self.rss[role] = max(self.rss[role], mi.rss)
                except psutil.Error:
                    pass
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(2.0)
        return {"rss_mb": {r: v / MB for r, v in self.rss.items()},
                "uss_mb": {r: v / MB for r, v in self.uss.items()}, "samples": self.samples}


def load_pieces(paths: list[Path]) -> list[dict]:
    """The raw per-process trace pieces (msgpack, as common.trace.dump writes them)."""
    return [msgpack.unpackb(p.read_bytes(), raw=False, strict_map_key=False) for p in paths]


def run_replica(opts: RunOptions, sample_rss: bool = True,
                keep_trace: bool = False) -> dict[str, Any]:
    """One run of the three processes toward a sink of our own; the figures it yields.

    The Supervisor is driven directly (not cli.execute) so that the pids can be sampled
    while the run goes on, and the trace pieces read before the run directory goes away.
    """
    sup = Supervisor(opts)
    if opts.extra.get("netdev") == "tap":  # the sink lives in the run's namespace
        caps: list[bl.UdpCapture] = []

        def start_capture(cfg: Any) -> None:
            caps.append(bl.UdpCapture(opts.packets, opts.size, ns=cfg.options["netns"]))
            opts.dest_port = cfg.options["dest_port"] = caps[0].port

        sup.before_spawn = start_capture
    else:
        caps = [bl.UdpCapture(opts.packets, opts.size)]
        opts.dest_port = caps[0].port
    sampler: RssSampler | None = None
    cpu: ThreadCpuSampler | None = None
    mem: dict[str, Any] = {}
    pieces: list[dict] = []
    cfg = None
    try:
        def start_sampler() -> None:
            nonlocal sampler, cpu
            if sample_rss:
                sampler = RssSampler({r: p.pid for r, p in sup.procs.items()})
                cpu = ThreadCpuSampler(os.getpid(), stages.wanted,
                                       pids=tuple(p.pid for p in sup.procs.values()))

        try:
            cfg = sup.run(on_started=start_sampler)
        finally:
            if sampler is not None:
                mem = sampler.stop()
            if cpu is not None:
                cpu.stop()
        cap = caps[0]
        cap.wait_for(opts.packets, 5.0)
        reports = sup.reports()
        if keep_trace:
            pieces = load_pieces(sup.trace_pieces())
    finally:
        for c in caps:
            c.close()
        sup.cleanup()
    sink = cap.summary()
    summary = build_summary(cfg.rid, opts, reports, sink, sup.t_end - sup.t_start)
    prog = reports.get("guest", {}).get("program", {})
    t0 = prog.get("t0_ns") or prog.get("start_ns")
    sent = summary.get("sent") or 0
    out: dict[str, Any] = {
        "size": opts.size, "packets": opts.packets, "sent": sent,
        "kicks": summary.get("kicks"), "tx_interrupts": summary.get("tx_interrupts"),
        "kicks_per_packet": (summary.get("kicks") or 0) / sent if sent else None,
        "interrupts_per_packet": (summary.get("tx_interrupts") or 0) / sent if sent else None,
        "guest_send_pps": summary.get("packets_per_second"),
        "elapsed_s": summary.get("elapsed_s"),
        "tx_drained": reports.get("guest", {}).get("tx_drained"),
        "device_errors": summary.get("device_errors"),
        **{k: reports.get("qemu", {}).get("virtio_net", {}).get(k)
           for k in ("tx_polls", "tx_poll_hits")},
        "first_send_ns": t0,
        "sink": sink,
        **bl.e2e_rates(sink, t0),
        **mem,
        "cpu": stages.run_window(cpu, t0, sink) if cpu is not None else None,
    }
    if keep_trace:
        out["pieces"] = pieces
    return out


def replica_options(plan: Plan, size: int, **changes: Any) -> RunOptions:
    return replace(RunOptions(mode="tx", packets=plan.e2e_packets, size=size, timeout=120.0),
                   **changes)


def checked(label: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None],
            failures: list[dict]) -> dict[str, Any] | None:
    """Run one measurement; a run that fails is recorded, not fatal."""
    t = time.monotonic()
    try:
        r = fn()
    except (RunFailed, TimeoutError, RuntimeError, OSError) as e:
        failures.append({"run": label, "error": f"{type(e).__name__}: {e}"})
        log(f"  {label}: FAILED {e}")
        return None
    log(f"  {label}: {time.monotonic() - t:.1f} s")
    return r


# -- kick -> virtqueue_pop from the trace pieces ---------------------------------------------------


STAGES_ON = ("ioeventfd_write", "virtio_queue_host_notifier_read", "virtio_queue_notify")
STAGES_OFF = ("kvm_pio", "kvm_userspace_exit", "virtio_queue_notify")


def kick_pop_latencies(pieces: list[dict], stages: tuple[str, ...]) -> dict[str, Any]:
    """Each TX kick's time to the device's ``virtqueue_pop`` of the buffer it announced.

    Kick time: the guest's ``virtqueue_notify`` span entry right after a
    ``virtqueue_kick_prepare`` that said needs_kick (the event's own time if spans are
    missing). The buffer: avail index ``new - 1`` of that kick; QEMU pops a TX queue in avail
    order, so its k-th ``virtqueue_pop`` there took avail index k. Stages: the first record of
    each named event (any process) between the kick and the pop.
    """
    by_role = {p["role"]: p for p in pieces}
    guest = by_role.get("guest", {}).get("records", [])
    kicks: list[tuple[int, int, int]] = []  # ts, new, batch
    pending: tuple[int, int, int, int] | None = None
    for ts, tid, ph, name, args in guest:
        if name == "virtqueue_kick_prepare" and ph == "i" and args \
                and str(args.get("vq", "")).startswith("output") and args.get("needs_kick"):
            if pending is not None:
                kicks.append(pending[:3])
            pending = (ts, args["new"], (args["new"] - args["old"]) & 0xFFFF, tid)
        elif name == "virtqueue_notify" and ph == "B" and pending is not None \
                and tid == pending[3]:
            kicks.append((ts, pending[1], pending[2]))
            pending = None
    if pending is not None:
        kicks.append(pending[:3])
    pops: dict[int, list[int]] = {}
    popped: dict[int, int] = {}  # TX queue index -> pops so far
    named: dict[str, list[int]] = {s: [] for s in stages}
    for p in pieces:
        for ts, _, ph, name, args in p.get("records", []):
            n = vq_index(args.get("vq")) if name == "virtqueue_pop" and args else None
            if n is not None and n % 2 == 1:
                pops.setdefault(popped.get(n, 0) & 0xFFFF, []).append(ts)
                popped[n] = popped.get(n, 0) + 1
            elif name in named and ph in ("i", "B"):
                named[name].append(ts)
    for v in named.values():
        v.sort()
    lat: list[float] = []
    stage_us: dict[str, list[float]] = {s: [] for s in stages}
    early = unmatched = 0
    for ts, new, _ in kicks:
        cands = [t for t in pops.get((new - 1) & 0xFFFF, []) if t >= ts]
        if not cands:
            if pops.get((new - 1) & 0xFFFF):
                early += 1  # the device found the buffer before the kick arrived
            else:
                unmatched += 1
            continue
        pop = min(cands)
        lat.append((pop - ts) / 1000)
        for s in stages:
            i = bisect.bisect_left(named[s], ts)
            if i < len(named[s]) and named[s][i] <= pop:
                stage_us[s].append((named[s][i] - ts) / 1000)
    return {"kicks": len(kicks), "matched": len(lat), "popped_before_kick": early,
            "unmatched": unmatched, "alone": sum(1 for k in kicks if k[2] == 1),
            "p50_us": bl.percentile(lat, 50), "p99_us": bl.percentile(lat, 99),
            "stages_p50_us": {s: bl.percentile(v, 50) for s, v in stage_us.items() if v}}


IRQ_EVENTS = {"guest": ("irq_handler_entry",), "qemu": ("virtio_notify",)}
IRQ_MODES = {"MSI-X": None, "INTx": 0}
"""The interrupt kinds timed: --vectors default (one MSI-X vector per queue) and 0 (INTx)."""


def notify_irq_latencies(pieces: list[dict]) -> dict[str, Any]:
    """Each interrupt QEMU raised to the guest's handler for it: QEMU's ``virtio_notify``
    (an interrupt is due) to the guest's next ``irq_handler_entry`` of a device vector.

    A notify that another follows before the guest's handler ran shares that interrupt
    (an edge already pending, a line already up): only the last one of them is timed.
    """
    notifies: list[int] = []
    entries: list[int] = []
    for p in pieces:
        for ts, _, ph, name, args in p.get("records", []):
            if ph != "i":
                continue
            if name == "virtio_notify" and p["role"] == "qemu":
                notifies.append(ts)
            elif name == "irq_handler_entry" and p["role"] == "guest" \
                    and (args or {}).get("irq") != LOCAL_TIMER_VECTOR:
                entries.append(ts)
    notifies.sort()
    entries.sort()
    lat: list[float] = []
    for i, ts in enumerate(notifies):
        j = bisect.bisect_left(entries, ts)
        if j == len(entries):
            continue
        if i + 1 < len(notifies) and notifies[i + 1] <= entries[j]:
            continue
        lat.append((entries[j] - ts) / 1000)
    return {"notifies": len(notifies), "matched": len(lat),
            "p50_us": bl.percentile(lat, 50), "p99_us": bl.percentile(lat, 99),
            "max_us": max(lat) if lat else None}


# -- the sections -------------------------------------------------------------------------------


def section_vring(plan: Plan, log: Callable[[str], None], failures: list[dict]) -> dict:
    """1. The split vring between two processes vs. bare ring, POSIX MQ, mp.Queue."""
    trials: list[dict] = []
    order = list(bl.TRANSPORTS)
    for t in range(plan.micro_trials):
        for size in plan.sizes:
            for transport in order[t % len(order):] + order[: t % len(order)]:
                r = checked(f"vring-only trial {t + 1} {transport} {size} B",
                            lambda tr=transport, s=size: bl.run_transport(tr, s,
                                                                          plan.micro_packets),
                            log, failures)
                if r is not None:
                    trials.append({"trial": t, **r})
    table: dict[str, dict[str, Any]] = {}
    for size in plan.sizes:
        row: dict[str, Any] = {}
        for transport in bl.TRANSPORTS:
            rs = [r for r in trials if r["transport"] == transport and r["size"] == size]
            row[transport] = median([r["pps"] for r in rs])
            if transport == "vring":
                row["vring_kicks_per_packet"] = median(
                    [r["kicks"] / r["packets"] for r in rs])
        row["vring_over_bare"] = ratio(row["vring"], row["bare"])
        table[str(size)] = row
    sides: dict[str, dict[str, Any]] = {}
    for size in plan.sizes:
        rs = []
        for t in range(plan.micro_trials):
            r = checked(f"vring-only per-side cost trial {t + 1} {size} B",
                        lambda s=size: bl.ring_side_costs(s, plan.flush_rounds // 4), log,
                        failures)
            if r is not None:
                rs.append(r)
        side = {k: median([r[k] for r in rs]) for k in (rs[0] if rs else {})}
        if side:
            vb = 1e9 / max(side["vring_driver_ns"], side["vring_device_ns"])
            bb = 1e9 / max(side["bare_producer_ns"], side["bare_consumer_ns"])
            side.update({"vring_bound_pps": vb, "bare_bound_pps": bb,
                         "bound_ratio": vb / bb})
        sides[str(size)] = side
    return {"packets": plan.micro_packets, "trials": trials, "median_pps": table,
            "side_costs": sides, "complete": all(r["complete"] for r in trials)}


def section_e2e(plan: Plan, log: Callable[[str], None], failures: list[dict]) -> dict:
    """2, 4, 5 (tracing on), 6, 7: the replica end to end in each mode, and the baseline."""
    runs: list[dict] = []
    base: list[dict] = []
    ceiling: list[dict] = []
    for t in range(plan.trials):
        for size in plan.sizes:
            r = checked(f"e2e trial {t + 1} mp.Queue+sendto {size} B",
                        lambda s=size: bl.mpqueue_sendto(s, plan.e2e_packets), log, failures)
            if r is not None:
                base.append({"trial": t, **r})
            r = checked(f"e2e trial {t + 1} sendto alone {size} B",
                        lambda s=size: bl.sendto_ceiling(s, plan.e2e_packets), log, failures)
            if r is not None:
                ceiling.append({"trial": t, **r})
            for mode in plan.modes + ("trace=on",):
                changes = MODES.get(mode, {})
                traced = mode == "trace=on"
                opts = replica_options(plan, size, trace="bench" if traced else None,
                                       **changes)
                r = checked(f"e2e trial {t + 1} {mode} {size} B",
                            lambda o=opts, tr=traced: run_replica(o, sample_rss=not tr),
                            log, failures)
                if r is not None:
                    runs.append({"trial": t, "mode": mode, **r})
    return {"packets": plan.e2e_packets, "runs": runs, "baseline_runs": base,
            "ceiling_runs": ceiling}


def section_latency(plan: Plan, log: Callable[[str], None], failures: list[dict]) -> dict:
    """3. Kick -> virtqueue_pop, paced, from the trace; vs. a semaphore ping-pong.

    The timed runs switch on only the trace events the figures are read from
    (``--trace-events``, QEMU's ``-trace enable=PATTERN``); one run per trial keeps every
    span and event on (what ``--trace`` gives), to show what tracing adds.
    """
    wanted = {"guest": ("virtqueue_kick_prepare",),
              "kvm": ("ioeventfd_write", "kvm_pio", "kvm_userspace_exit"),
              "qemu": ("virtqueue_pop", "virtio_queue_notify")}
    selection = [e for evs in wanted.values() for e in evs]

    def stages(ioeventfd: bool, selected: bool) -> tuple[str, ...]:
        """The stages a run times: those of its path that its trace events include."""
        path = STAGES_ON if ioeventfd else STAGES_OFF
        return tuple(s for s in path if s in selection) if selected else path

    def timed_run(ioeventfd: bool, selected: bool, tx: str = "bh") -> dict[str, Any]:
        opts = RunOptions(mode="tx", packets=plan.latency_packets, size=64,
                          pace_ms=plan.pace_ms, ioeventfd=ioeventfd, tx=tx, trace="bench",
                          trace_events=",".join(selection) if selected else None, timeout=120.0)
        r = run_replica(opts, sample_rss=False, keep_trace=True)
        lat = kick_pop_latencies(r.pop("pieces"), stages(ioeventfd, selected))
        return {"ioeventfd": ioeventfd, "trace": "selected" if selected else "all", "tx": tx,
                **lat, "sink": r["sink"], "kicks_reported": r["kicks"]}

    def irq_run(vectors: int | None) -> dict[str, Any]:
        opts = RunOptions(mode="tx", packets=plan.latency_packets, size=64,
                          pace_ms=plan.pace_ms, vectors=vectors, trace="bench",
                          trace_events=",".join(e for evs in IRQ_EVENTS.values() for e in evs),
                          timeout=120.0)
        r = run_replica(opts, sample_rss=False, keep_trace=True)
        return {**notify_irq_latencies(r.pop("pieces")), "sink": r["sink"]}

    out: dict[str, Any] = {"packets": plan.latency_packets, "pace_ms": plan.pace_ms,
                           "size": 64, "runs": [], "runs_all_traced": [], "runs_tx_timer": [],
                           "irq_runs": [], "tx_timeout_us": TX_TIMER_INTERVAL_NS / 1000,
                           "pingpong": [],
                           "pingpong_paced": [], "pingpong_paced_cross_cpu": [],
                           "trace_events": {r: list(e) for r, e in wanted.items()}}
    cross = (0, 1) if len(os.sched_getaffinity(0) & {0, 1}) == 2 else None
    for t in range(plan.latency_trials):
        r = checked(f"latency trial {t + 1} semaphore ping-pong, back to back",
                    lambda: bl.sem_pingpong(plan.pingpong_rounds), log, failures)
        if r is not None:
            out["pingpong"].append(r)
        r = checked(f"latency trial {t + 1} semaphore ping-pong, paced",
                    lambda: bl.sem_pingpong(plan.latency_packets, 10, plan.pace_ms / 1000),
                    log, failures)
        if r is not None:
            out["pingpong_paced"].append(r)
        if cross is not None:
            r = checked(f"latency trial {t + 1} semaphore ping-pong, paced, CPUs {cross}",
                        lambda: bl.sem_pingpong(plan.latency_packets, 10, plan.pace_ms / 1000,
                                                cpus=cross), log, failures)
            if r is not None:
                out["pingpong_paced_cross_cpu"].append(r)
        for ioeventfd, selected in ((True, True), (False, True), (True, False)):
            label = (f"latency trial {t + 1} ioeventfd={'on' if ioeventfd else 'off'}"
                     + ("" if selected else ", every trace event on"))
            r = checked(label, lambda i=ioeventfd, s=selected: timed_run(i, s), log, failures)
            if r is not None:
                out["runs" if selected else "runs_all_traced"].append({"trial": t, **r})
        r = checked(f"latency trial {t + 1} tx=timer", lambda: timed_run(True, True, "timer"),
                    log, failures)
        if r is not None:
            out["runs_tx_timer"].append({"trial": t, **r})
        for irq, vectors in IRQ_MODES.items():
            r = checked(f"latency trial {t + 1} notify -> interrupt, {irq}",
                        lambda v=vectors: irq_run(v), log, failures)
            if r is not None:
                out["irq_runs"].append({"trial": t, "irq": irq, **r})

    def fold_runs(rs: list[dict], names: tuple[str, ...]) -> dict[str, Any]:
        return {"p50_us": median([r["p50_us"] for r in rs]),
                "p99_us": median([r["p99_us"] for r in rs]),
                "kicks": sum(r["kicks"] for r in rs), "matched": sum(r["matched"] for r in rs),
                "alone": sum(r["alone"] for r in rs),
                "stages_p50_us": {s: median([r["stages_p50_us"].get(s) for r in rs])
                                  for s in names}}

    for on in (True, False):
        key = "ioeventfd_on" if on else "ioeventfd_off"
        out[key] = fold_runs([r for r in out["runs"] if r["ioeventfd"] == on], stages(on, True))
    out["ioeventfd_on_all_traced"] = fold_runs(out["runs_all_traced"], stages(True, False))
    out["tx_timer"] = tt = fold_runs(out["runs_tx_timer"], stages(True, True))
    notify = tt["stages_p50_us"].get("virtio_queue_notify")
    tt["notify_to_pop_p50_us"] = None if tt["p50_us"] is None or notify is None \
        else tt["p50_us"] - notify
    tt["over_timeout"] = ratio(tt["p50_us"], out["tx_timeout_us"])
    out["notify_irq"] = {irq: {k: median([r[k] for r in out["irq_runs"] if r["irq"] == irq])
                               for k in ("p50_us", "p99_us")}
                         | {"matched": sum(r["matched"] for r in out["irq_runs"]
                                           if r["irq"] == irq)}
                         for irq in IRQ_MODES}
    for key in ("pingpong", "pingpong_paced", "pingpong_paced_cross_cpu"):
        out[f"{key}_rtt_us_p50"] = median([r["rtt_us_p50"] for r in out[key]])
        out[f"{key}_rtt_us_p99"] = median([r["rtt_us_p99"] for r in out[key]])
    out["on_over_pingpong"] = ratio(out["ioeventfd_on"]["p50_us"],
                                    out["pingpong_paced_rtt_us_p50"])
    out["on_over_pingpong_back_to_back"] = ratio(out["ioeventfd_on"]["p50_us"],
                                                 out["pingpong_rtt_us_p50"])
    out["on_over_pingpong_pinned"] = ratio(out["ioeventfd_on"]["p50_us"],
                                           out["pingpong_paced_cross_cpu_rtt_us_p50"])
    return out


def section_trace_cost(plan: Plan, log: Callable[[str], None], failures: list[dict]) -> dict:
    """5. Trace points that are off: the flush loop as shipped vs. stripped of them."""
    trials = []
    for t in range(plan.micro_trials):
        for size in plan.sizes:
            r = checked(f"trace-off trial {t + 1} {size} B",
                        lambda s=size: bl.flush_trace_cost(plan.flush_rounds, s), log, failures)
            if r is not None:
                trials.append({"trial": t, **r})
    keys = ("cost", "control", "ns_per_packet_shipped", "ns_per_packet_stripped",
            "ns_per_packet_control")
    per_size = {str(s): {k: median([r[k] for r in trials if r["size"] == s]) for k in keys}
                for s in plan.sizes}
    return {"rounds": plan.flush_rounds, "trials": trials, "per_size": per_size,
            "guards_stripped": trials[0]["guards_stripped"] if trials else None}


def section_chaos(plan: Plan, log: Callable[[str], None], failures: list[dict]) -> dict:
    """8. Device resets (ring faults) and restarts (kill -9 of QEMU) under load both ways:
    how long each kept the device down and the most frames one of them lost."""
    from vreplica.stress.stress import parse_args, run_stress

    a = parse_args(["--duration", "4" if plan.quick else "12", "--queues", "2", "--mode", "both",
                    "--chaos", "ring-fault,kill-device", "--chaos-period", "1",
                    "--no-progress"])
    v = checked("chaos: ring-fault,kill-device", lambda: run_stress(a)[0], log, failures)
    if v is None:
        return {}
    keys = ("resets", "reset_down_ms", "reset_down_ms_max", "reset_rx_down_ms_max",
            "reset_lost_max", "restarts", "restart_down_ms", "restart_down_ms_max",
            "restart_lost_max", "verdict", "reasons", "inbound_rate_pps")
    return {k: v.get(k) for k in keys} | {"reset_down_ms_p50": median(v["reset_down_ms"]),
                                         "restart_down_ms_p50": median(v["restart_down_ms"])}


# -- folding the runs into figures --------------------------------------------------------------


def pps_basis(runs: list[dict]) -> str:
    """Use last arrival - first send when every replica run said when its first send was."""
    if runs and all(r.get("pps_send_to_last_arrival") for r in runs):
        return "pps_send_to_last_arrival"
    return "pps_arrival_window"


def all_delivered(rs: list[dict]) -> bool:
    """Every one of (at least one) runs delivered all its datagrams, in order and intact."""
    return bool(rs) and all(r["sink"]["complete"] and not r["sink"]["bad_payloads"] for r in rs)


def sink_check(what: str, r: dict) -> dict[str, Any]:
    """A run's line in the correctness list: what its sink saw."""
    sink = r["sink"]
    return {"run": f"{what} {r['size']} B trial {r['trial'] + 1}",
            "complete": sink["complete"], "in_order": sink["in_order"],
            "bad_payloads": sink["bad_payloads"], "received": sink["received"],
            "expected": r["packets"]}


def fold(e2e: dict, plan: Plan) -> dict[str, Any]:
    runs, base = e2e["runs"], e2e["baseline_runs"]
    basis = pps_basis(runs)
    modes: dict[str, dict[str, Any]] = {}
    for mode in plan.modes + ("trace=on",):
        for size in plan.sizes:
            rs = [r for r in runs if r["mode"] == mode and r["size"] == size]
            modes.setdefault(mode, {})[str(size)] = {
                "pps": median([r[basis] for r in rs]),
                "pps_min": min((r[basis] for r in rs if r[basis]), default=None),
                "pps_max": max((r[basis] for r in rs if r[basis]), default=None),
                "pps_arrival_window": median([r["pps_arrival_window"] for r in rs]),
                "guest_send_pps": median([r["guest_send_pps"] for r in rs]),
                "kicks_per_packet": median([r["kicks_per_packet"] for r in rs]),
                "interrupts_per_packet": median([r["interrupts_per_packet"] for r in rs]),
                **{f"{k}_{f.__name__}": f((r[k] for r in rs if r[k] is not None),
                                          default=None)
                   for k in ("kicks_per_packet", "interrupts_per_packet") for f in (min, max)},
                "trials": len(rs),
                "all_delivered_in_order": all_delivered(rs),
            }
    e2e_tab: dict[str, dict[str, Any]] = {}
    for size in plan.sizes:
        bs = [b for b in base if b["size"] == size]
        b_pps = median([b.get(basis) for b in bs])
        r_pps = modes["default"][str(size)]["pps"]
        c_pps = median([c.get(basis) for c in e2e.get("ceiling_runs", [])
                        if c["size"] == size])
        tap_pps = modes.get("tap", {}).get(str(size), {}).get("pps")
        vhost_pps = modes.get("tap+vhost", {}).get(str(size), {}).get("pps")
        e2e_tab[str(size)] = {
            "tap_pps": tap_pps, "vhost_pps": vhost_pps,
            "vhost_over_tap": ratio(vhost_pps, tap_pps),
            "vhost_over_baseline": ratio(vhost_pps, b_pps),
            "tap_over_baseline": ratio(tap_pps, b_pps),
            "replica_pps": r_pps, "baseline_pps": b_pps, "ratio": ratio(r_pps, b_pps),
            "sendto_alone_pps": c_pps, "sendto_alone_ratio": ratio(c_pps, b_pps),
            "baseline_pps_min": min((b[basis] for b in bs if b.get(basis)), default=None),
            "baseline_pps_max": max((b[basis] for b in bs if b.get(basis)), default=None),
            "baseline_pps_send_to_last_arrival": median(
                [b.get("pps_send_to_last_arrival") for b in bs]),
            "baseline_all_delivered_in_order": all_delivered(bs)}
    rss: dict[str, dict[str, Any]] = {}
    plain = [r for r in runs if r["mode"] != "trace=on" and r.get("rss_mb")]
    for role in ROLES:
        rss[role] = {
            "rss_mb_max": max((r["rss_mb"].get(role, 0) for r in plain), default=None),
            "rss_mb_median": median([r["rss_mb"].get(role) for r in plain]),
            "uss_mb_max": max((r["uss_mb"].get(role, 0) for r in plain), default=None),
            "rss_mb_max_by_size": {str(s): max((r["rss_mb"].get(role, 0) for r in plain
                                                if r["size"] == s), default=None)
                                   for s in plan.sizes}}
    tracing_on = {str(s): {"pps_off": modes["default"][str(s)]["pps"],
                           "pps_on": modes["trace=on"][str(s)]["pps"],
                           "slowdown": ratio(modes["default"][str(s)]["pps"],
                                             modes["trace=on"][str(s)]["pps"])}
                  for s in plan.sizes}
    correctness = [sink_check(r["mode"], r) for r in runs]
    correctness += [sink_check("mp.Queue+sendto", b) for b in base]
    correctness += [sink_check("sendto alone", c) for c in e2e.get("ceiling_runs", [])]
    return {"basis": basis, "modes": modes, "end_to_end": e2e_tab, "rss": rss,
            "tracing_on": tracing_on, "correctness": correctness,
            "stalled_runs": [f"{r['mode']} {r['size']} B trial {r['trial'] + 1}"
                             for r in runs if r.get("tx_drained") is False]}


def targets(res: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """Each of the project's goals with the measured figure and PASS/FAIL (n/a: a path
    that was not measured, such as a backend this tree does not have)."""
    out = []
    sizes = [str(s) for s in plan.sizes]

    def add(key: str, measured: str, values: list[Any], ok: Callable[[Any], bool]) -> None:
        """PASS if ``ok`` holds for every value, n/a if one is missing."""
        passed = None if not values or None in values else all(ok(x) for x in values)
        out.append({"key": key, "target": TARGETS[key], "measured": measured,
                    "result": "n/a" if passed is None else ("PASS" if passed else "FAIL")})

    def per_size(values: list[Any], fmt: Callable[[Any], str]) -> str:
        return ", ".join(f"{SIZE_LABEL[int(s)]}: {fmt(x)}"
                         for s, x in zip(sizes, values, strict=True))

    modes = res["modes"]
    e64 = res["end_to_end"].get("64", {})
    add("e2e", f"64: {fmt_x(e64.get('ratio'))} ({fmt_f(e64.get('replica_pps'))} vs "
               f"{fmt_f(e64.get('baseline_pps'))} pkt/s)", [e64.get("ratio")],
        lambda x: x >= 1.0)
    lat = res["kick_latency"]
    r = lat.get("on_over_pingpong_pinned")
    add("latency", f"p50 {fmt_f(lat['ioeventfd_on']['p50_us'], 1)} us vs "
                   f"{fmt_f(lat.get('pingpong_paced_cross_cpu_rtt_us_p50'), 1)} us: {fmt_x(r)}",
        [r], lambda x: x <= 1.5)
    costs = [res["tracing"]["off"]["per_size"][s]["cost"] for s in sizes]
    add("trace_off", per_size(costs, fmt_pct), costs, lambda c: c <= 0.03)

    def at64(mode: str, key: str = "pps") -> Any:
        return modes.get(mode, {}).get("64", {}).get(key)

    def over_default(mode: str) -> float | None:
        return ratio(at64(mode), at64("default"))

    ev = over_default("event-idx=off")
    add("event_idx", f"64: {fmt_x(ev)} ({fmt_f(at64('event-idx=off'))} pkt/s, "
                     f"{fmt_f(at64('event-idx=off', 'interrupts_per_packet'), 2)} "
                     "interrupts/packet)", [ev], lambda x: x >= 0.48)
    tb = [over_default("tx-burst=16"), over_default("tx-burst=64")]
    add("tx_burst", f"64: {fmt_x(tb[0])}, {fmt_x(tb[1])}", tb, lambda x: x >= 0.95)
    io = over_default("ioeventfd=off")
    add("ioeventfd", f"64: off at {fmt_x(io)} the speed of on", [io], lambda x: x <= 1.0)
    t = lat.get("tx_timer", {})
    add("tx_timer", f"p50 {fmt_f(t.get('p50_us'), 1)} us: {fmt_x(t.get('over_timeout'))} of "
                    f"{fmt_f(lat.get('tx_timeout_us'))} us (virtio_queue_notify -> pop "
                    f"{fmt_f(t.get('notify_to_pop_p50_us'), 1)} us)",
        [t.get("over_timeout")], lambda x: x <= 2)
    sides = res["vring_only"]["side_costs"]
    vr = [sides.get(s, {}).get("bound_ratio") for s in sizes]
    add("vring", per_size(vr, fmt_x), vr, lambda x: x >= 0.3)
    m = modes["default"]
    for key, k in (("kicks", "kicks_per_packet"), ("irqs", "interrupts_per_packet")):
        per_packet = [m[s][k] for s in sizes]
        add(key, per_size(per_packet, lambda x: fmt_f(x, 4)), per_packet, lambda x: x <= 0.01)
    rss = res["rss"]
    peaks = [rss[role]["rss_mb_max"] for role in ROLES]
    add("rss", ", ".join(f"{role} {fmt_f(rss[role]['rss_mb_max'], 1)} MB" for role in ROLES),
        peaks, lambda p: p <= 50)
    tap = modes.get("tap", {})
    for mode, speed, burst in (("tap+vhost", "vhost", "vhost_burst"),
                               ("vhost-user", "vhost_user", "vhost_user_burst")):
        mm = modes.get(mode, {})
        if not mm:
            add(speed, f"no {mode} path measured", [], bool)
            add(burst, f"no {mode} path measured", [], bool)
            continue
        rs = [ratio(mm[s]["pps"], tap.get(s, {}).get("pps")) for s in sizes]
        add(speed, per_size(rs, fmt_x), rs, lambda x: x >= 1.0)
        pairs = [(mm[s][k], tap.get(s, {}).get(k)) for s in sizes
                 for k in ("kicks_per_packet", "interrupts_per_packet")]
        add(burst, ", ".join(
            f"{SIZE_LABEL[int(s)]}: kicks {fmt_f(mm[s]['kicks_per_packet'], 4)} vs "
            f"{fmt_f(tap.get(s, {}).get('kicks_per_packet'), 4)}, interrupts "
            f"{fmt_f(mm[s]['interrupts_per_packet'], 4)} vs "
            f"{fmt_f(tap.get(s, {}).get('interrupts_per_packet'), 4)}" for s in sizes),
            [None if None in p else p for p in pairs], lambda p: p[0] <= p[1])
    cpu = res.get("cpu_stages") or {}
    vh, tp = cpu.get("tap+vhost", {}), cpu.get("tap", {})
    dev = [(vh.get(s, {}).get("device_us_per_packet"), tp.get(s, {}).get("device_us_per_packet"))
           for s in sizes]
    add("vhost_device", ", ".join(f"{SIZE_LABEL[int(s)]}: {fmt_f(a, 2)} vs {fmt_f(b, 2)} us"
                                  for s, (a, b) in zip(sizes, dev, strict=True)),
        [None if None in p else p for p in dev], lambda p: p[0] < p[1])
    wk = [(vh.get(s, {}).get("us_per_packet", {}).get("vhost worker"),
           tp.get(s, {}).get("us_per_packet", {}).get("QEMU main loop")) for s in sizes]
    add("vhost_worker", ", ".join(
        f"{SIZE_LABEL[int(s)]}: {fmt_f(a, 2)} vs {fmt_f(b, 2)} us ({fmt_x(ratio(a, b))})"
        for s, (a, b) in zip(sizes, wk, strict=True)),
        [None if None in p else p for p in wk], lambda p: p[0] <= 0.6 * p[1])
    order = list(TARGETS)
    return sorted(out, key=lambda t: order.index(t["key"]))


# -- the report ---------------------------------------------------------------------------------


def guard_share(per_size: dict[str, Any], pps: float | None) -> float | None:
    """The guards' ns per packet over an end-to-end packet's whole time."""
    a, b = per_size["ns_per_packet_shipped"], per_size["ns_per_packet_stripped"]
    return None if a is None or b is None or not pps else (a - b) * pps / 1e9


def fmt_f(x: float | None, nd: int = 0) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def fmt_spread(d: dict[str, Any], key: str) -> str:
    """A median with the trials' range: ``51,541 (45,002-80,311)``."""
    lo, hi = d.get(f"{key}_min"), d.get(f"{key}_max")
    if lo is None or hi is None:
        return fmt_f(d.get(key))
    return f"{fmt_f(d.get(key))} ({fmt_f(lo)}-{fmt_f(hi)})"


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": f"{platform.system()} {platform.release()}",
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def render_markdown(res: dict[str, Any], plan: Plan, png_name: str) -> str:
    m = res["machine"]
    sizes = [str(s) for s in plan.sizes]
    basis = res["basis"]
    basis_text = ("delivered packets / (last arrival at the host socket - the guest's first "
                  "send)" if basis == "pps_send_to_last_arrival" else
                  "(delivered packets - 1) / (last - first arrival at the host socket); the "
                  "guest does not report when its first send began, so the first packet's "
                  "one-way latency (tens of microseconds, < 0.1 % of a window) is left out, "
                  "and the baseline is measured the same way")
    L: list[str] = [
        "# Benchmarks", "",
        f"`vreplica bench{' --quick' if plan.quick else ''}`, {m['date']}, "
        f"{res['duration_s']:.0f} s.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['kernel']}; "
        f"load average {', '.join(map(str, m['load_average']))} at the start, "
        f"{', '.join(map(str, res['load_average_end']))} at the end (other work on the "
        "machine shares its cores with the benchmark).", "",
        "Every figure is the median of the trials named in its section; every ratio compares "
        "figures from this same invocation. \"1500\" means a 1472-byte UDP payload, the "
        "largest datagram the replica carries in its 1500-byte MTU (1514-byte frame).", "",
        "## Targets", "",
    ]
    L += table(["target", "measured", "result"],
               [[t["target"], t["measured"], f"**{t['result']}**"] for t in res["targets"]])
    if res["failures"]:
        L += ["Runs that failed (left out of the figures):", ""]
        L += [f"* {f['run']}: {f['error']}" for f in res["failures"]] + [""]

    v = res["vring_only"]
    L += ["## 1. vring only: two processes, null backend", "",
          f"{v['packets']:,} payloads per trial, {plan.micro_trials} trials, packets/s from the "
          "producer's start to the consumer's last receive. The vring is the replica's own "
          "code: `guestproc.virtio_ring` (vring_create_virtqueue, virtqueue_add_outbuf, "
          "virtqueue_kick_prepare, virtqueue_get_buf to reclaim, EVENT_IDX on) in one process, "
          "`qemuproc.virtio` (VirtQueue on the same GuestMemory via virtio_queue_set_addr, "
          "virtqueue_pop, virtqueue_push, virtio_notify) in the other; the device copies each "
          "payload out (`bytes()`) and drops it. Both shared-memory rings poll: each side spins "
          "on the other's index (yielding the CPU after 64 empty polls in a row), so no kick "
          "or interrupt is delivered (the vring still runs its suppression logic; kicks it "
          "asked for are counted). The queues block in the "
          "kernel as they are built to. Every transport copies the payload in once and out "
          "once; ring and queue depth 256 (the POSIX queue: as deep as the system allows, "
          f"{next((r.get('queue_depth') for r in v['trials'] if r.get('queue_depth')), '-')}).",
          ""]
    rows = []
    for t in bl.TRANSPORTS:
        rows.append([bl.TRANSPORT_NAMES[t]] + [fmt_f(v["median_pps"][s][t]) for s in sizes])
    rows.append(["**vring / bare ring**"] + [fmt_x(v["median_pps"][s]["vring_over_bare"])
                                             for s in sizes])
    rows.append(["vring kicks asked per packet"] + [
        fmt_f(v["median_pps"][s].get("vring_kicks_per_packet"), 4) for s in sizes])
    L += table(["packets/s"] + [SIZE_LABEL[int(s)] for s in sizes], rows)
    sc = v["side_costs"]
    L += ["The same per-packet work timed a ring at a time in one process (each side's code "
          "alone: no second core, spinning or cache-line transfer in it, so the figures hold "
          "whatever else the machine runs); a two-core pipeline can go no faster than its "
          "slower side:", ""]
    rows = [[name] + [fmt_f(sc[s].get(key)) for s in sizes] for name, key in (
        ("vring driver (add, kick_prepare, reclaim), ns/packet", "vring_driver_ns"),
        ("vring device (pop, copy out, push, notify), ns/packet", "vring_device_ns"),
        ("bare ring producer, ns/packet", "bare_producer_ns"),
        ("bare ring consumer, ns/packet", "bare_consumer_ns"),
        ("vring bound, packets/s", "vring_bound_pps"),
        ("bare ring bound, packets/s", "bare_bound_pps"))]
    rows.append(["**vring / bare ring, bounds**"] + [fmt_x(sc[s].get("bound_ratio"))
                                                     for s in sizes])
    L += table([""] + [SIZE_LABEL[int(s)] for s in sizes], rows)

    e = res["end_to_end"]
    L += ["## 2. End to end: guest -> KVM -> QEMU -> slirp -> host UDP socket", "",
          f"{res['e2e_packets']:,} datagrams per run, {plan.trials} trials, QEMU defaults "
          "(--tx bh --tx-burst 256 --event-idx on --ioeventfd on). Delivered and timed by the "
          "benchmark's own sink on 127.0.0.1 (kernel receive timestamps, every payload "
          f"checked). Packets/s = {basis_text}. The baseline: the same Ethernet frames "
          "(built per packet with their checksums, payloads made before the clock as the "
          "guest does), put on a multiprocessing.Queue(256) by one process; another takes "
          "each, cuts the 42 header bytes and sendto()s the payload to the same kind of sink. "
          "The ceiling: one process that does nothing but sendto() the payloads, one call per "
          "datagram as libslirp's sosendto makes, to the same kind of sink; no path that "
          "sends each datagram on its own goes faster from one Python process.", ""]
    rows = [["replica (3 processes)"] + [fmt_spread(res["modes"]["default"][s], "pps")
                                         for s in sizes],
            ["mp.Queue + sendto (2 processes)"] + [fmt_spread(e[s], "baseline_pps")
                                                   for s in sizes],
            ["**replica / baseline**"] + [fmt_x(e[s]["ratio"]) for s in sizes],
            ["replica over a tap (QEMU's tap backend, the host's stack, a socket at "
             "10.0.2.2)"] + [fmt_spread(res["modes"].get("tap", {}).get(s, {}), "pps")
                             for s in sizes],
            ["replica over a tap with vhost-net (the worker process vhost-<pid> serves the rings)"]
            + [fmt_spread(res["modes"].get("tap+vhost", {}).get(s, {}), "pps") for s in sizes],
            ["guest send rate over the tap / with vhost-net"] + [
                f"{fmt_f(res['modes'].get('tap', {}).get(s, {}).get('guest_send_pps'))} / "
                f"{fmt_f(res['modes'].get('tap+vhost', {}).get(s, {}).get('guest_send_pps'))}"
                for s in sizes],
            ["**tap+vhost / tap**"] + [fmt_x(e[s].get("vhost_over_tap")) for s in sizes],
            ["**tap+vhost / baseline**"] + [fmt_x(e[s].get("vhost_over_baseline"))
                                            for s in sizes],
            ["replica: guest send rate (summary's packets/s)"] + [
                fmt_f(res["modes"]["default"][s]["guest_send_pps"]) for s in sizes],
            ["sendto() alone, 1 process: the ceiling of one sendto per datagram"] + [
                fmt_f(e[s].get("sendto_alone_pps")) for s in sizes],
            ["ceiling / baseline"] + [fmt_x(e[s].get("sendto_alone_ratio")) for s in sizes]]
    L += table(["packets/s, median (range over trials)"] + [SIZE_LABEL[int(s)] for s in sizes],
               rows)
    L += ["The tap rows run the same guest program into a real tap in the run's own network "
          "namespace, to the same kind of sink bound at 10.0.2.2 there (its kernel "
          "timestamps, every payload checked). The guest's send rate equals the arrival "
          "rate in every path: the guest's driver, one Python process, bounds all of them, "
          "so what vhost-net saves on the device side shows only as far as the guest can "
          "send faster; on a loaded machine the trials' ranges show how much the scheduler "
          "decides.", ""]

    lat = res["kick_latency"]
    L += ["## 3. Kick -> virtqueue_pop latency", "",
          f"{lat['packets']} datagrams of 64 B paced {lat['pace_ms']} ms apart (each kick "
          f"alone), {plan.latency_trials} trials. The three processes dump "
          "their raw trace pieces (msgpack: ts_ns, thread, ph, name, args) into the run "
          "directory at exit; the benchmark drives the Supervisor itself and reads them "
          "before the directory is removed. Only the trace events the figures are read from "
          "are on (`--trace-events`, as QEMU's `-trace enable=`; no spans): "
          + "; ".join(f"{role}: " + ", ".join(f"`{e}`" for e in evs)
                      for role, evs in lat.get("trace_events", {}).items())
          + ". Kick = the guest's `virtqueue_kick_prepare` event that "
          "said needs_kick (with spans off it stands for the `virtqueue_notify` entry that "
          "follows it about a microsecond later, so a kick is if anything timed early); "
          "pop = QEMU's `virtqueue_pop` of that kick's buffer (avail index new-1); one "
          "CLOCK_MONOTONIC for all processes. One more run per trial has every span and "
          "trace point on (what `--trace` gives), to show what tracing adds to the path. "
          f"Of {lat['ioeventfd_on']['kicks']} + {lat['ioeventfd_off']['kicks']} TX kicks "
          f"(ioeventfd on + off), {lat['ioeventfd_on']['matched']} + "
          f"{lat['ioeventfd_off']['matched']} were matched to their pop; "
          f"{lat['ioeventfd_on']['alone']} + {lat['ioeventfd_off']['alone']} announced "
          "exactly one buffer. Baseline: a posix_ipc.Semaphore pair between two processes, "
          "round trip (post, then wait for the other's post), measured in this invocation "
          "both back to back and paced like the kicks (the pinger sleeps "
          f"{lat['pace_ms']} ms before each round, so each starts from idle processes, as "
          "each paced kick does). Left alone, the "
          "scheduler usually runs the two ends of a paced ping-pong on one CPU, so its "
          "wakeups are local; the paced ping-pong pinned to two CPUs shows what a wakeup "
          "of an idle CPU costs on this machine, which the kick path, spread over three "
          "processes, pays at least once; the target compares with that one.", ""]
    on, off = lat["ioeventfd_on"], lat["ioeventfd_off"]
    all_on = lat.get("ioeventfd_on_all_traced", {})
    rows = [["kick -> pop, ioeventfd on", fmt_f(on["p50_us"], 1), fmt_f(on["p99_us"], 1)],
            ["kick -> pop, ioeventfd off", fmt_f(off["p50_us"], 1), fmt_f(off["p99_us"], 1)],
            ["kick -> pop, ioeventfd on, every trace event on",
             fmt_f(all_on.get("p50_us"), 1), fmt_f(all_on.get("p99_us"), 1)],
            ["semaphore ping-pong round trip, paced", fmt_f(lat["pingpong_paced_rtt_us_p50"], 1),
             fmt_f(lat["pingpong_paced_rtt_us_p99"], 1)],
            ["semaphore ping-pong round trip, paced, pinned to two CPUs",
             fmt_f(lat.get("pingpong_paced_cross_cpu_rtt_us_p50"), 1),
             fmt_f(lat.get("pingpong_paced_cross_cpu_rtt_us_p99"), 1)],
            ["semaphore ping-pong round trip, back to back",
             fmt_f(lat["pingpong_rtt_us_p50"], 1), fmt_f(lat["pingpong_rtt_us_p99"], 1)],
            ["ioeventfd on / paced ping-pong (p50)", fmt_x(lat["on_over_pingpong"]), ""],
            ["**ioeventfd on / paced ping-pong pinned to two CPUs (p50)**",
             fmt_x(lat.get("on_over_pingpong_pinned")), ""]]
    tt = lat.get("tx_timer", {})
    rows += [["kick -> pop, tx=timer (ioeventfd on)", fmt_f(tt.get("p50_us"), 1),
              fmt_f(tt.get("p99_us"), 1)],
             ["virtio_queue_notify -> pop, tx=timer (the timer's own share)",
              fmt_f(tt.get("notify_to_pop_p50_us"), 1), ""],
             [f"**tx=timer / the {fmt_f(lat.get('tx_timeout_us'))} us x-txtimer (p50)**",
              fmt_x(tt.get("over_timeout")), ""]]
    L += table(["microseconds", "p50", "p99"], rows)
    L += ["With `tx=timer` a kick arms the 150 us `x-txtimer` and the main loop sleeps in "
          "`qemu_poll_ns` (ppoll, ns timeout, 1 ns timer slack as QEMU's `init_clocks` sets) "
          "until that deadline; the kick's own path to `virtio_queue_notify` is the same as "
          "with the bottom half.", ""]
    stage_rows = [[f"{what}: kick -> `{s}`", fmt_f(x, 1)]
                  for what, r in (("ioeventfd on", on), ("ioeventfd off", off),
                                  ("ioeventfd on, every trace event on", all_on))
                  for s, x in r.get("stages_p50_us", {}).items()]
    L += ["Where the time goes (p50 from the kick to the first such event, any process):", ""]
    L += table(["stage", "us"], stage_rows)
    irq = lat.get("notify_irq", {})
    L += ["", "Notify -> interrupt, same trials, same pacing: QEMU's `virtio_notify` (an "
          "interrupt is due; the main loop then sends it: KVM_SIGNAL_MSI, or KVM_IRQ_LINE_STATUS "
          "for INTx) to the guest's `irq_handler_entry` of a device vector (after the x2APIC "
          "EOI exit for an MSI, Linux's edge flow; before it for INTx, the fasteoi flow). A "
          "notify another follows before the handler ran shares its interrupt and is not "
          "timed. Trace events on: " + ", ".join(f"`{e}`" for evs in IRQ_EVENTS.values()
                                                 for e in evs) + ".", ""]
    L += table(["microseconds", "p50", "p99", "timed"],
               [[f"notify -> interrupt, {k}", fmt_f(v.get("p50_us"), 1),
                 fmt_f(v.get("p99_us"), 1), str(v.get("matched", 0))] for k, v in irq.items()])

    L += ["## 4. Kicks and interrupts per packet, saturating burst", "",
          "From the default-mode runs of section 2 (the guest sends back to back): the "
          "driver's kicks and the device's TX-queue interrupts (virtio_notify calls that raised "
          "an interrupt), per packet sent.", ""]
    d = res["modes"]["default"]
    L += table(["per packet, median (range over trials)"] + [SIZE_LABEL[int(s)] for s in sizes],
               [[name] + [f"{fmt_f(d[s][k], 4)} ({fmt_f(d[s][k + '_min'], 4)}-"
                          f"{fmt_f(d[s][k + '_max'], 4)})" for s in sizes]
                for name, k in (("kicks", "kicks_per_packet"),
                                ("TX interrupts", "interrupts_per_packet"))])
    L += ["How often the device catches up with the driver decides both: with EVENT_IDX the "
          "device asks for a kick at every pop (avail_event = last_avail_idx, as QEMU's "
          "virtqueue_split_pop does), so a kick comes whenever it has drained the ring, and "
          "the driver's virtqueue_enable_cb_delayed asks for an interrupt after 3/4 of what "
          "is pending. Both move with the relative speed of the guest and QEMU processes, "
          "hence the range.", ""]

    tr = res["tracing"]
    off_t = tr["off"]
    L += ["## 5. The cost of tracing", "",
          f"Off: `virtio_net_flush_tx` over a full 256-entry ring into a null backend, "
          f"{off_t['rounds']} rounds x {plan.micro_trials} trials, round by round in turn "
          "between the modules as shipped (trace points off: each costs an `if trace_x.on:` "
          "test) and copies of `qemuproc.net`, `qemuproc.virtio`, `qemuproc.virtio_net` "
          "compiled from their source with every such block removed "
          f"({off_t['guards_stripped']} guards; `@traced` is already the bare function when "
          "tracing is off). A third set, compiled the same way with nothing removed, is the "
          "control: its difference from the shipped modules is the method's own error. "
          "On: end-to-end packets/s of the default mode with --trace.", ""]
    rows = [["flush loop, ns/packet, as shipped"] + [
        fmt_f(off_t["per_size"][s]["ns_per_packet_shipped"]) for s in sizes],
            ["flush loop, ns/packet, guards stripped"] + [
        fmt_f(off_t["per_size"][s]["ns_per_packet_stripped"]) for s in sizes],
            ["**cost of tracing off**"] + [fmt_pct(off_t["per_size"][s]["cost"])
                                           for s in sizes],
            ["control: shipped vs. an unstripped copy (method error)"] + [
        fmt_pct(off_t["per_size"][s].get("control")) for s in sizes],
            ["the same, as a share of an end-to-end packet (1/pps)"] + [
        fmt_pct(guard_share(off_t["per_size"][s], res["modes"]["default"][s]["pps"]))
        for s in sizes],
            ["end to end packets/s, tracing off"] + [fmt_f(tr["on"][s]["pps_off"])
                                                     for s in sizes],
            ["end to end packets/s, --trace"] + [fmt_f(tr["on"][s]["pps_on"]) for s in sizes],
            ["slowdown with --trace"] + [fmt_x(tr["on"][s]["slowdown"]) for s in sizes]]
    L += table([""] + [SIZE_LABEL[int(s)] for s in sizes], rows)

    L += ["## 6. Memory", "",
          "psutil, sampled every 20 ms (USS every 100 ms) while every untraced end-to-end run "
          "of section 2/7 went on (both sizes, all modes); peak over the runs. RSS counts "
          "the pages of the shared guest RAM segment (16 MiB) that a process touched; USS "
          "is what the process alone holds.", ""]
    L += table(["process", "peak RSS MB"] + [f"peak RSS MB, {SIZE_LABEL[int(s)]}" for s in sizes]
               + ["median peak RSS MB", "peak USS MB"],
               [[role, fmt_f(res["rss"][role]["rss_mb_max"], 1)]
                + [fmt_f(res["rss"][role]["rss_mb_max_by_size"][s], 1) for s in sizes]
                + [fmt_f(res["rss"][role]["rss_mb_median"], 1),
                   fmt_f(res["rss"][role]["uss_mb_max"], 1)] for role in ROLES])
    L += [f"The guest program makes all {res['e2e_packets']:,} payloads before its clock "
          "starts (guestproc.programs.udp_send), so the guest's RSS grows with --packets "
          "and --size: that list, not the driver, is most of the difference between the "
          "two sizes.", ""]

    L += ["## 7. QEMU modes, end to end", "",
          "Each mode changes one setting from the default; same runs, sink and basis as "
          "section 2. Interrupts = TX-queue interrupts.", ""]
    rows = []
    for mode in plan.modes + ("trace=on",):
        for s in sizes:
            r = res["modes"][mode][s]
            rows.append([mode, SIZE_LABEL[int(s)], fmt_spread(r, "pps"),
                         fmt_f(r["kicks_per_packet"], 4), fmt_f(r["interrupts_per_packet"], 4),
                         "yes" if r["all_delivered_in_order"] else "**no**"])
    L += table(["mode", "payload", "packets/s (range)", "kicks/packet", "interrupts/packet",
                "all delivered, in order"], rows)
    L += [f"![packets/s by mode and payload size]({png_name})", ""]
    if res["stalled_runs"]:
        L += ["Runs whose guest timed out waiting for its TX completions: "
              + ", ".join(res["stalled_runs"]), ""]
    L += ["Correctness: every run above was checked at the sink (count, order, payload "
          f"bytes): {sum(1 for c in res['correctness'] if c['complete'])} of "
          f"{len(res['correctness'])} complete and in order.", ""]
    c = res.get("chaos") or {}
    if c:
        L += ["## 8. Device resets and restarts under load", "",
              "`stress --mode both --queues 2 --chaos ring-fault,kill-device`: a reset runs from "
              "the config interrupt to DRIVER_OK with RX buffers posted (the guest's own clock); "
              "a restart from the kill to the new QEMU's device ready (its -incoming record). "
              "Frames lost: those the event's outage took, by sequence number. "
              f"Verdict: {c['verdict']}.", ""]
        L += table(["event", "count", "down p50 (ms)", "down max (ms)", "most frames lost by one"],
                   [["device reset (ring fault)", str(c["resets"]),
                     fmt_f(c["reset_down_ms_p50"], 1), fmt_f(c["reset_down_ms_max"], 1),
                     str(c["reset_lost_max"])],
                    ["QEMU restart (kill -9)", str(c["restarts"]),
                     fmt_f(c["restart_down_ms_p50"], 1), fmt_f(c["restart_down_ms_max"], 1),
                     str(c["restart_lost_max"])]])
    tr = res.get("transport") or {}
    if tr:
        L += ["", "## 9. Legacy against modern virtio-pci, same run", "",
              f"64-byte datagrams, {tr['packets']} a run end to end; notify -> pop paced "
              f"({tr['pace_ms']} ms, {tr['latency_packets']} a run) with ioeventfd off, so "
              "each kick is a VM exit QEMU's vCPU thread handles: KVM_EXIT_IO (legacy port "
              "write) or KVM_EXIT_MMIO (modern notify store). Medians of the trials.", "",
              *transport_table(tr)]
    L += render_rings(res.get("rings") or {}, plan)
    events = {m: {s: (v.get("kicks_per_packet") or 0) + (v.get("interrupts_per_packet") or 0)
                  for s, v in per.items()} for m, per in res["modes"].items()}
    L += stages.render(res.get("cpu_stages") or {}, plan.sizes, LEGEND, "11", events)
    return "\n".join(L)


def plot(res: dict[str, Any], plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [str(s) for s in plan.sizes]
    labels = ["mp.Queue+sendto\n(baseline)"] + [m.replace("=", "=\n") for m in
                                               plan.modes + ("trace=on",)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1.4]})
    width = 0.8 / len(sizes)
    for i, s in enumerate(sizes):
        e = res["end_to_end"][s]
        cells = [{"pps": e["baseline_pps"], "pps_min": e.get("baseline_pps_min"),
                  "pps_max": e.get("baseline_pps_max")}] + [
            res["modes"][m][s] for m in plan.modes + ("trace=on",)]
        vals = [c["pps"] or 0 for c in cells]
        err = [[max(0, v - (c.get("pps_min") or v)) for v, c in zip(vals, cells, strict=True)],
               [max(0, (c.get("pps_max") or v) - v) for v, c in zip(vals, cells, strict=True)]]
        xs = [j + (i - (len(sizes) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, vals, width, yerr=err, capsize=2, label=LEGEND[int(s)])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("packets/s delivered to the host socket\n(median; bars: range over trials)")
    ax.set_title("End to end, by QEMU mode and payload size")
    ax.legend()
    v = res["vring_only"]["median_pps"]
    names = list(bl.TRANSPORTS)
    for i, s in enumerate(sizes):
        xs = [j + (i - (len(sizes) - 1) / 2) * width for j in range(len(names))]
        ax2.bar(xs, [v[s][t] or 0 for t in names], width, label=LEGEND[int(s)])
    ax2.set_xticks(range(len(names)), ["vring", "bare\nring", "POSIX\nMQ", "mp.\nQueue"],
                   fontsize=8)
    ax2.set_yscale("log")
    ax2.set_title("Two processes, no network (section 1)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"virtio-net-replica, {res['machine']['cpu']}, {res['machine']['cores']} cores"
                 + (" (--quick)" if plan.quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the command --------------------------------------------------------------------------------


def run_bench(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.monotonic()
    failures: list[dict] = []
    res: dict[str, Any] = {"machine": machine(), "plan": asdict(plan),
                           "e2e_packets": plan.e2e_packets}
    log("1. vring only")
    res["vring_only"] = section_vring(plan, log, failures)
    log("5. tracing off: flush loop")
    off = section_trace_cost(plan, log, failures)
    log("3. kick -> pop latency")
    res["kick_latency"] = section_latency(plan, log, failures)
    log("2/4/5/6/7. end to end")
    e2e = section_e2e(plan, log, failures)
    folded = fold(e2e, plan)
    res["end_to_end_runs"] = e2e
    res.update({k: folded[k] for k in ("basis", "end_to_end", "rss", "correctness",
                                       "stalled_runs", "modes")})
    res["kicks_interrupts"] = {s: {k: folded["modes"]["default"][s][k]
                                   for k in ("kicks_per_packet", "interrupts_per_packet")}
                               for s in folded["modes"]["default"]}
    res["tracing"] = {"off": off, "on": folded["tracing_on"]}
    res["cpu_stages"] = stages.fold_paths(e2e["runs"], plan.sizes)
    log("8. chaos: resets and restarts")
    res["chaos"] = section_chaos(plan, log, failures)
    log("9. legacy vs modern transport")
    res["transport"] = section_transport(plan, log, failures)
    log("10. split ring against packed ring")
    res["rings"] = section_rings(plan, log, failures)
    res["failures"] = failures
    res["duration_s"] = time.monotonic() - t0
    res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    res["targets"] = targets(res, plan)
    return res


def section_stages(plan: Plan, log: Callable[[str], None], failures: list[dict]) -> dict:
    """11 alone: the end-to-end runs of each path the stage table covers."""
    runs: list[dict] = []
    for t in range(plan.trials):
        for size in plan.sizes:
            for mode in stages.CPU_PATHS:
                opts = replica_options(plan, size, **MODES[mode])
                r = checked(f"stages trial {t + 1} {mode} {size} B",
                            lambda o=opts: run_replica(o), log, failures)
                if r is not None:
                    runs.append({"trial": t, "mode": mode, **r})
    events = {m: {str(z): median([(r["kicks_per_packet"] or 0)
                                  + (r["interrupts_per_packet"] or 0)
                                  for r in runs if r["mode"] == m and r["size"] == z])
                  for z in plan.sizes} for m in stages.CPU_PATHS}
    return {"packets": plan.e2e_packets, "paths": stages.fold_paths(runs, plan.sizes),
            "events_per_packet": events,
            "runs": [{k: r[k] for k in ("trial", "mode", "size", "delivered", "cpu",
                                         "pps_send_to_last_arrival", "kicks_per_packet",
                                         "interrupts_per_packet")} for r in runs]}


def only_section(plan: Plan, json_path: str | None, which: str = "transport") -> int:
    """``--only transport|rings|stages``: the legacy-vs-modern, split-vs-packed or CPU per
    stage section alone."""
    if json_path:
        try:
            writable_file("--json", json_path)
        except UsageError as e:
            print(f"vreplica bench: {e}", file=sys.stderr)
            return 2
    failures: list[dict] = []

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if which == "rings":
        sec = section_rings(plan, log, failures)
        print("\n".join(render_rings(sec, plan)))
    elif which == "stages":
        sec = section_stages(plan, log, failures)
        print("\n".join(stages.render(sec["paths"], plan.sizes, LEGEND, "11",
                                       sec["events_per_packet"])))
    else:
        sec = section_transport(plan, log, failures)
        print("\n".join(transport_table(sec)))
    if json_path:
        Path(json_path).write_text(json.dumps({which: sec, "failures": failures},
                                              indent=1, default=str))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="vreplica bench", description=__doc__.split("\n\n")[0],
               label="vreplica bench")
    p.add_argument("--quick", action="store_true", help="fewer and smaller trials (~1 min)")
    p.add_argument("--trials", type=int, metavar="N",
                   help="trials behind each figure (default 3; 5 for the ring alone, full "
                        "run); 1 is a smoke run whose medians are single samples")
    p.add_argument("--json", metavar="FILE", help="write every figure here")
    p.add_argument("--out", metavar="DIR", help="write BENCHMARKS.md and bench.png here "
                   "(default: the repository root)")
    p.add_argument("--only", choices=("transport", "rings", "stages"),
                   help="run one section and print its table (no BENCHMARKS.md): transport "
                        "(9, legacy against modern), rings (10, split against packed) or "
                        "stages (11, CPU per packet per stage on each path)")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else FULL
    if a.trials is not None:
        if not 1 <= a.trials <= 50:
            print("vreplica bench: --trials: from 1 to 50", file=sys.stderr)
            return 2
        plan = replace(plan, trials=a.trials, micro_trials=a.trials, latency_trials=a.trials)
    if a.only:
        return only_section(plan, a.json, a.only)
    out = Path(a.out) if a.out else ROOT
    try:
        writable_dir("--out", out)
        if out.is_dir():
            for name in ("BENCHMARKS.md", "bench.png"):
                writable_file("--out", out / name)
        if a.json:
            writable_file("--json", a.json)
    except UsageError as e:
        print(f"vreplica bench: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    res = run_bench(plan, log)
    png = out / "bench.png"
    plot(res, plan, png)
    (out / "BENCHMARKS.md").write_text(render_markdown(res, plan, png.name))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    for t in res["targets"]:
        print(f"{t['result']:4}  {t['target']}: {t['measured']}")
    print(f"wrote {out / 'BENCHMARKS.md'} and {png}" + (f" and {a.json}" if a.json else ""))
    return 0


__all__ = ["main", "run_replica", "kick_pop_latencies", "MODES", "Plan", "QUICK", "FULL"]
