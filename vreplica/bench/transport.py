"""The benchmark's legacy-against-modern section: the same runs over each virtio-pci
transport, in one invocation.

* end to end: packets per second (guest send rate and send -> last arrival at the sink),
  kicks and TX interrupts per packet;
* notify -> pop with ioeventfd off, paced: the kick leaves KVM as KVM_EXIT_IO (a port write,
  legacy) or KVM_EXIT_MMIO (a store to the notify region, modern) for QEMU's vCPU thread,
  read from the trace as bench's kick -> pop latency is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vreplica.bench.core import (
    Plan,
    checked,
    kick_pop_latencies,
    median,
    replica_options,
    run_replica,
)
from vreplica.run.supervisor import RunOptions

TRANSPORTS = ("legacy", "modern")
EXIT_EVENT = {"legacy": "kvm_pio", "modern": "kvm_mmio"}
"""KVM's trace event for the kick's VM exit on each transport."""


def section_transport(plan: Plan, log: Callable[[str], None], failures: list[dict]) -> dict:

    e2e: list[dict] = []
    lat: list[dict] = []
    selection = ["virtqueue_kick_prepare", "kvm_pio", "kvm_mmio", "kvm_userspace_exit",
                 "virtqueue_pop", "virtio_queue_notify"]

    def latency_run(transport: str) -> dict[str, Any]:
        opts = RunOptions(mode="tx", packets=plan.latency_packets, size=64,
                          pace_ms=plan.pace_ms, ioeventfd=False, trace="bench",
                          trace_events=",".join(selection), timeout=120.0,
                          extra={"transport": transport})
        r = run_replica(opts, sample_rss=False, keep_trace=True)
        stages = (EXIT_EVENT[transport], "kvm_userspace_exit", "virtio_queue_notify")
        return {**kick_pop_latencies(r.pop("pieces"), stages), "sink": r["sink"]}

    for t in range(plan.trials):
        for transport in TRANSPORTS:
            opts = replica_options(plan, 64, extra={"transport": transport})
            r = checked(f"transport trial {t + 1} {transport} e2e 64 B",
                        lambda o=opts: run_replica(o, sample_rss=False), log, failures)
            if r is not None:
                e2e.append({"trial": t, "transport": transport, **r})
            r = checked(f"transport trial {t + 1} {transport} notify -> pop, ioeventfd off",
                        lambda tr=transport: latency_run(tr), log, failures)
            if r is not None:
                lat.append({"trial": t, "transport": transport, **r})
    out: dict[str, Any] = {"packets": plan.e2e_packets, "latency_packets": plan.latency_packets,
                           "pace_ms": plan.pace_ms, "e2e_runs": e2e, "latency_runs": lat}
    for transport in TRANSPORTS:
        rs = [r for r in e2e if r["transport"] == transport]
        ls = [r for r in lat if r["transport"] == transport]
        out[transport] = {
            "delivered_all": all(r.get("delivered") == r["packets"] for r in rs),
            **{k: median([r.get(k) for r in rs])
               for k in ("guest_send_pps", "pps_send_to_last_arrival", "kicks_per_packet",
                         "interrupts_per_packet")},
            "notify_pop_p50_us": median([r["p50_us"] for r in ls]),
            "notify_pop_p99_us": median([r["p99_us"] for r in ls]),
            "matched": sum(r["matched"] for r in ls),
            "exit_p50_us": median([r["stages_p50_us"].get(EXIT_EVENT[transport]) for r in ls]),
            "queue_notify_p50_us": median([r["stages_p50_us"].get("virtio_queue_notify")
                                           for r in ls]),
        }
    return out


def transport_table(sec: dict[str, Any]) -> list[str]:
    """The section as Markdown table rows."""
    def f(x: float | None, nd: int = 0) -> str:
        return "-" if x is None else f"{x:,.{nd}f}"

    rows = ["| transport | guest send pps | send -> last arrival pps | kicks / pkt | "
            "TX irqs / pkt | notify -> pop p50 / p99 (us), ioeventfd off | kick's exit "
            "in KVM, p50 (us) | virtio_queue_notify, p50 (us) |",
            "|---|---|---|---|---|---|---|---|"]
    for t in TRANSPORTS:
        d = sec.get(t, {})
        rows.append(f"| {t} ({'PIO' if t == 'legacy' else 'MMIO'} kick) "
                    f"| {f(d.get('guest_send_pps'))} | {f(d.get('pps_send_to_last_arrival'))} "
                    f"| {f(d.get('kicks_per_packet'), 4)} | {f(d.get('interrupts_per_packet'), 4)} "
                    f"| {f(d.get('notify_pop_p50_us'), 1)} / {f(d.get('notify_pop_p99_us'), 1)} "
                    f"| {f(d.get('exit_p50_us'), 1)} | {f(d.get('queue_notify_p50_us'), 1)} |")
    return rows
