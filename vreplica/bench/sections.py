"""The benchmark's sections: the ring alone, end to end, kick latency, the cost of tracing,
chaos and the CPU per stage alone; each measures its runs and returns its figures."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from qemuproc.virtio_net import TX_TIMER_INTERVAL_NS
from vreplica.bench import baselines as bl
from vreplica.bench import stages
from vreplica.bench.core import (
    IRQ_EVENTS,
    IRQ_MODES,
    MODES,
    STAGES_OFF,
    STAGES_ON,
    Plan,
    checked,
    kick_pop_latencies,
    median,
    notify_irq_latencies,
    ratio,
    replica_options,
    run_replica,
)
from vreplica.run.supervisor import RunOptions


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


def fold_runs(rs: list[dict], names: tuple[str, ...]) -> dict[str, Any]:
    """Latency runs' medians, their counts summed, and each stage's median."""
    return {"p50_us": median([r["p50_us"] for r in rs]),
            "p99_us": median([r["p99_us"] for r in rs]),
            "kicks": sum(r["kicks"] for r in rs), "matched": sum(r["matched"] for r in rs),
            "alone": sum(r["alone"] for r in rs),
            "stages_p50_us": {s: median([r["stages_p50_us"].get(s) for r in rs])
                              for s in names}}


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
