"""BENCHMARKS.md and bench.png from the benchmark's figures."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

from vreplica.bench import baselines as bl
from vreplica.bench import stages
from vreplica.bench.core import IRQ_EVENTS, LEGEND, ROLES, SIZE_LABEL, Plan
from vreplica.bench.fmt import fmt_f, fmt_pct, fmt_spread, fmt_x, table
from vreplica.bench.rings import render_rings
from vreplica.bench.transport import transport_table


def guard_share(per_size: dict[str, Any], pps: float | None) -> float | None:
    """The guards' ns per packet over an end-to-end packet's whole time."""
    a, b = per_size["ns_per_packet_shipped"], per_size["ns_per_packet_stripped"]
    return None if a is None or b is None or not pps else (a - b) * pps / 1e9


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


def _basis_text(res: dict[str, Any]) -> str:
    """How packets/s was computed, in words."""
    basis = res["basis"]
    return ("delivered packets / (last arrival at the host socket - the guest's first "
                  "send)" if basis == "pps_send_to_last_arrival" else
                  "(delivered packets - 1) / (last - first arrival at the host socket); the "
                  "guest does not report when its first send began, so the first packet's "
                  "one-way latency (tens of microseconds, < 0.1 % of a window) is left out, "
                  "and the baseline is measured the same way")


def _md_head(res: dict[str, Any], plan: Plan, sizes: list[str]) -> list[str]:
    """The title, the machine, and the goals table."""
    m = res["machine"]
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
        "The goals of docs/speed.md, each with the figure measured here and whether it is "
        "met.", "",
    ]
    L += table(["target", "measured", "result"],
               [[t["target"], t["measured"], f"**{t['result']}**"] for t in res["targets"]])
    if res["failures"]:
        L += ["Runs that failed (left out of the figures):", ""]
        L += [f"* {f['run']}: {f['error']}" for f in res["failures"]] + [""]
    return L


def _md_vring(res: dict[str, Any], plan: Plan, sizes: list[str]) -> list[str]:
    """Section 1: the ring alone against the bare ring and the IPC baselines."""
    L: list[str] = []
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
    return L


def _md_e2e(res: dict[str, Any], plan: Plan, sizes: list[str]) -> list[str]:
    """Section 2: end to end against the baselines."""
    basis_text = _basis_text(res)
    L: list[str] = []
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
    return L


def _md_latency(res: dict[str, Any], plan: Plan, sizes: list[str]) -> list[str]:
    """Section 3: kick -> virtqueue_pop, and notify -> interrupt."""
    L: list[str] = []
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
    return L


def _md_kicks(res: dict[str, Any], plan: Plan, sizes: list[str]) -> list[str]:
    """Section 4: kicks and interrupts per packet in a saturating burst."""
    L: list[str] = []
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
    return L


def _md_tracing(res: dict[str, Any], plan: Plan, sizes: list[str]) -> list[str]:
    """Section 5: what tracing costs, off and on."""
    L: list[str] = []
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
    return L


def _md_memory(res: dict[str, Any], plan: Plan, sizes: list[str]) -> list[str]:
    """Section 6: each process's memory."""
    L: list[str] = []
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
    return L


def _md_modes(res: dict[str, Any], plan: Plan, sizes: list[str], png_name: str) -> list[str]:
    """Section 7: QEMU's modes end to end."""
    L: list[str] = []
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
    return L


def _md_chaos(res: dict[str, Any], plan: Plan, sizes: list[str]) -> list[str]:
    """Section 8: device resets and restarts under load."""
    L: list[str] = []
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
    return L


def _md_transports(res: dict[str, Any], plan: Plan, sizes: list[str]) -> list[str]:
    """Sections 9 and 10: legacy against modern, split against packed."""
    L: list[str] = []
    tr = res.get("transport") or {}
    if tr:
        L += ["", "## 9. Legacy against modern virtio-pci, same run", "",
              f"64-byte datagrams, {tr['packets']} a run end to end; notify -> pop paced "
              f"({tr['pace_ms']} ms, {tr['latency_packets']} a run) with ioeventfd off, so "
              "each kick is a VM exit QEMU's vCPU thread handles: KVM_EXIT_IO (legacy port "
              "write) or KVM_EXIT_MMIO (modern notify store). Medians of the trials.", "",
              *transport_table(tr)]
    L += render_rings(res.get("rings") or {}, plan)
    return L


def _md_stages(res: dict[str, Any], plan: Plan, sizes: list[str]) -> list[str]:
    """Section 11: CPU per packet per stage on each path."""
    events = {m: {s: (v.get("kicks_per_packet") or 0) + (v.get("interrupts_per_packet") or 0)
                  for s, v in per.items()} for m, per in res["modes"].items()}
    return stages.render(res.get("cpu_stages") or {}, plan.sizes, LEGEND, "11", events)


def render_markdown(res: dict[str, Any], plan: Plan, png_name: str) -> str:
    sizes = [str(s) for s in plan.sizes]
    L: list[str] = []
    for part in (_md_head, _md_vring, _md_e2e, _md_latency, _md_kicks, _md_tracing,
                 _md_memory):
        L += part(res, plan, sizes)
    L += _md_modes(res, plan, sizes, png_name)
    L += _md_chaos(res, plan, sizes)
    L += _md_transports(res, plan, sizes)
    L += _md_stages(res, plan, sizes)
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


