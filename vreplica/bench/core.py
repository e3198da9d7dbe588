"""The benchmark's core: its plan, one measured run of the replica, and the kick -> pop and
notify -> interrupt latencies read from a run's trace pieces."""

from __future__ import annotations

import bisect
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import psutil

from common.kvm_abi import LOCAL_TIMER_VECTOR
from common.trace import vq_index
from vreplica.bench import baselines as bl
from vreplica.bench import stages
from vreplica.bench.stages import ThreadCpuSampler
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
    "vhost-user": {"extra": {"netdev": "vhost-user", "vhost_user_host": "tap", "csum": True}},
}
"""QEMU configurations run end to end; "default" is --tx bh --tx-burst 256 --event-idx on
--ioeventfd on --poll-us 0 over slirp, and every other changes one setting ("tap": QEMU's
tap backend into the run's namespace; "tap+vhost": vhost-net serves the rings; "vhost-user":
the replica's vhost-user back end serves them, over a tap in the run's namespace)."""

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
"""The project's speed goals (docs/speed.md); ``results.targets`` measures each."""


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
    in_netns = opts.extra.get("netdev") == "tap" or opts.extra.get("vhost_user_host") == "tap"
    if in_netns:  # the sink lives in the run's namespace
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


# -- what a set of runs delivered ---------------------------------------------------------------


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


